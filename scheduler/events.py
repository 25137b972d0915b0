"""Events: what an executor (simulator or live runtime) tells the scheduler.

Every event is a frozen dataclass of ids and numbers, so a run can be logged as JSON lines
(`codec.py`) and replayed in a test. The executor calls `Scheduler.handle(event, now)` for each
one, in time order, and carries out the returned actions.

Invariants the executor keeps:
- one `StepFinished` per engine iteration it ran under a grant; the last one of a grant says
  `grant_done=True` (it ran all granted iterations or had nothing left of the granted kind);
- at most one `HandedOver` per `HandOver` action, after it was carried out;
- one `MemoryDone` per `Load`/`Unload`/`KvResize`/`Evict` action, echoing its `action_id`, with
  the measured duration;
- `RequestCancelled` only after the executor has already stopped the request itself;
- `InstanceFailed` once per instance whose job raised, after the executor dropped it; no event
  names that instance afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from scheduler.specs import Tier

StepKind = Literal["prefill", "decode"]


@dataclass(frozen=True)
class RequestArrived:
    """A request for `model`. `max_output_tokens` is never used to predict (§4.2.2).

    `ttft_slo`/`tpot_slo` are the client's own SLOs in seconds, replacing the policy's defaults
    (§4.2.1) for this request; None keeps the default. The scheduler shrinks them by its safety
    margin exactly as it shrinks the defaults, so an override means what a default would.
    """

    request_id: str
    model: str
    input_tokens: int
    max_output_tokens: int
    arrival: float
    ttft_slo: float | None = None
    tpot_slo: float | None = None


@dataclass(frozen=True)
class StepFinished:
    """One engine iteration of `instance` ran under grant `grant_id`.

    `sequences` produced one token each (a prefill produces a request's next token too);
    `finished` ended (EOS or max tokens) and left the instance; `kv_blocks_used` is the
    instance's KV block count after the step (what the engine really holds).
    """

    instance: str
    grant_id: int
    kind: StepKind
    sequences: tuple[str, ...]
    finished: tuple[str, ...]
    kv_blocks_used: int
    elapsed: float
    grant_done: bool


@dataclass(frozen=True)
class HandedOver:
    """`instance` took `request_id` over (the `HandOver` action) and prefilled the tokens its
    source made since the rebuild; `produced`: that pass also made the request's next token (the
    client's pause is one weight pass), and `finished`: the token ended it. `kv_blocks_used` and
    `elapsed` as in `StepFinished`. It ran outside any grant. An executor whose hand-over makes no
    token and costs nothing (the simulator takes the gap's KV in for free) need not send it.
    """

    instance: str
    request_id: str
    produced: bool
    finished: bool
    kv_blocks_used: int
    elapsed: float


@dataclass(frozen=True)
class MemoryDone:
    """The memory action `action_id` on `instance` completed after `duration` seconds."""

    instance: str
    action_id: int
    duration: float


@dataclass(frozen=True)
class RequestCancelled:
    """The client went away; the executor has already aborted the sequence."""

    request_id: str


@dataclass(frozen=True)
class InstanceFailed:
    """A job on `instance` (a step, a load, a resize, an eviction) raised, so the executor dropped
    the instance: it holds none of its memory any more and has ended `requests`, those it had
    attached there, with an error.

    The scheduler forgets the instance at once, without memory actions: whatever it had in flight
    or queued will never complete, and a keep-alive would send the model's next request to a dead
    instance instead of a cold start. Requests still attached end too; requests it was evicting
    are placed again, as a completed eviction would.
    """

    instance: str
    requests: tuple[str, ...]


@dataclass(frozen=True)
class ModelTierChanged:
    """The fastest tier of `host` holding `model` is now `tier` (the model store's report).

    "host": in the host-memory cache; "disk": only on disk (the default until reported). Feeds
    the startup estimate (`startup.py`, ServerlessLLM §5.1); the scheduler answers no action.
    """

    host: str
    model: str
    tier: Tier


@dataclass(frozen=True)
class Tick:
    """Time passed; sent at (or after) `Scheduler.next_wakeup()` for timers."""


Event = Union[RequestArrived, StepFinished, HandedOver, MemoryDone, RequestCancelled, InstanceFailed,
              ModelTierChanged, Tick]
