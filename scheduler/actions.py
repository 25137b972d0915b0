"""Actions: what the scheduler asks an executor to do.

Frozen dataclasses of ids and numbers (JSON via `codec.py`). Semantics the executor keeps:

- `Grant`: run up to `iterations` engine steps of `kind` on `instance`, one `StepFinished` each.
  The scheduler issues at most one live grant per node (§4.2.3), and never grants an instance with
  a memory action in flight.
- `Assign`: attach a request to an instance, to be prefilled at its next prefill grant. The prompt
  is `input_tokens`; `resume_tokens` > 0 means the request was evicted after producing that many
  tokens and is re-prefilled together with them (recompute migration, §4.4.1). A migration is
  therefore `Evict` on the old instance followed, once placed again, by `Assign` on the new one.
- `Load`/`Unload`/`KvResize`/`Evict`: memory actions (§4.3.3). The scheduler hands one to the
  executor only when the instance is not computing and has no other memory action in flight, so
  executors may run them at once; each answers with `MemoryDone(action_id)`. An `Evict` may name
  a request the executor no longer holds (it finished or was cancelled meanwhile): skip it.
  Stale actions
  (superseded by a newer target of the same resource) are dropped inside the scheduler and never
  reach the executor.
- `CreateInstance`/`ReleaseInstance`: an instance shell (no weights, 0 KV) comes into being on a
  node before anything else names it, and goes away after its unload and KV release completed.
  Between the two it occupies the node ("nodes used", §6.1).
- `Drop`: the request will not be served (its first-token deadline passed while queued, or it was
  unplaceable); the executor reports it to the client. It counts as an SLO failure.
- `Migrate`: live migration, token-based (ServerlessLLM §4; `migration.py`). The destination
  rebuilds the request's KV from its tokens (prompt + generated so far) as prefill work at its next
  prefill grant, yielding no token; the source keeps decoding the request meanwhile. Before each
  prefill grant of the destination the executor sends it the tokens generated since, so that each
  rebuild round (`config.migration_rounds`) reaches the tokens the request had when it was
  granted. An `Evict` of the request on the destination cancels the rebuild (it ended or left its
  source first).
- `HandOver`: after the rebuild, with the source between grants: the request leaves the source
  (its KV freed there) and continues on the destination, which first takes in the tokens the
  source produced since the rebuild, and may make its next token in that pass (`HandedOver`
  reports the pass). Carried out at once, like `Assign`.
- `ColdStartGrace`: informational, sent when the request's instance first becomes ready; the
  request waited for a cold start and its TTFT SLO is extended by `seconds` (§4.5 "cold-start
  fairness"): the estimated start-up, bounded by the actual wait (`lifecycle.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from scheduler.events import StepKind


@dataclass(frozen=True)
class Grant:
    grant_id: int
    node: str
    instance: str
    kind: StepKind
    iterations: int


@dataclass(frozen=True)
class Assign:
    request_id: str
    instance: str
    input_tokens: int
    resume_tokens: int


@dataclass(frozen=True)
class CreateInstance:
    instance: str
    node: str
    model: str


@dataclass(frozen=True)
class ReleaseInstance:
    instance: str


@dataclass(frozen=True)
class Load:
    action_id: int
    instance: str


@dataclass(frozen=True)
class Unload:
    action_id: int
    instance: str


@dataclass(frozen=True)
class KvResize:
    action_id: int
    instance: str
    blocks: int
    from_blocks: int


@dataclass(frozen=True)
class Evict:
    action_id: int
    instance: str
    requests: tuple[str, ...]


@dataclass(frozen=True)
class Migrate:
    request_id: str
    source: str
    destination: str


@dataclass(frozen=True)
class HandOver:
    request_id: str
    source: str
    destination: str


@dataclass(frozen=True)
class Drop:
    request_id: str
    reason: str


@dataclass(frozen=True)
class ColdStartGrace:
    request_id: str
    seconds: float


Action = Union[Grant, Assign, CreateInstance, ReleaseInstance, Load, Unload, KvResize, Evict,
               Migrate, HandOver, Drop, ColdStartGrace]
MemoryAction = Union[Load, Unload, KvResize, Evict]
