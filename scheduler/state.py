"""The scheduler's mutable view of the cluster: requests, instances, nodes.

Plain state, the paper's words; the policy modules read and change it, `core.py` owns it.

Invariants:
- a request is attached to at most one instance; `Instance.context_tokens` is the sum of its
  requests' `context` (prompt + tokens generated);
- per instance and memory resource (weights, KV) there are three figures (§4.3.3): `target`
  (optimistic, what admission plans with), `actual` (pessimistic, what execution reserves) and
  `physical` (what the executor holds after the last completed action); physical ≤ actual;
- an instance with a memory action in flight or committed (in its `outbox`) is not granted compute;
- `Instance.ready_at` is the estimated end of a cold instance's weight load (`startup.py`), None
  when no estimate exists; it is set at creation and corrected when the load completes;
- a request being live-migrated (`migration.py`) stays attached to its source, which keeps
  decoding it, and sits in its destination's `copies` until the hand-over (`Request.copy_at`
  names the destination): first as prefill work that yields no token, then, once a prefill step
  ran it (`Instance.rebuilding` names those a prefill grant covers) and left it close enough to
  the source (`migration.caught_up`; else another round), `copy_ready`; a `draining` instance is
  migrating its requests out, takes no new one and is retired once empty.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import chain
from typing import Literal

from scheduler.costmodel import LatencyTable
from scheduler.specs import ModelSpec, NodeSpec

Resource = Literal["weights", "kv"]


@dataclass
class Request:
    id: str
    model: str
    input_tokens: int
    max_output_tokens: int
    arrival: float
    ttft_slo: float
    tpot_slo: float
    generated: int = 0
    grace: float = 0.0
    instance: "Instance | None" = None
    prefilled: bool = False
    retry_at: float = 0.0
    copy_at: "Instance | None" = None
    copy_ready: bool = False
    copy_rounds: int = 0            # rebuild rounds granted on `copy_at`
    copy_sent: int = 0              # the request's context when the latest round was granted

    @property
    def context(self) -> int:
        """Tokens whose KV the request holds once prefilled (prompt + generated)."""
        return self.input_tokens + self.generated

    @property
    def deadline(self) -> float:
        """When the next token is due (Eq. 1, cumulative)."""
        return self.deadline_after(self.grace)

    def deadline_after(self, grace: float) -> float:
        """The next-token deadline were the request granted `grace` s of cold start instead."""
        return self.arrival + grace + self.ttft_slo + self.tpot_slo * self.generated


@dataclass
class ResourceState:
    """One memory resource of an instance in bytes (weights) or blocks (KV)."""

    target: int = 0
    actual: int = 0
    physical: int = 0
    version: int = 0


@dataclass
class MemoryOp:
    """A registered memory action, before it becomes an `actions.*` for the executor.

    `resource` is None for an eviction (it frees KV but sets no target).
    """

    op_id: int
    instance: "Instance"
    resource: Resource | None
    value: int
    version: int
    requests: tuple[str, ...] = ()


@dataclass
class Instance:
    id: str
    model: ModelSpec
    node: "Node"
    table: LatencyTable
    created: float
    requests: dict[str, Request] = field(default_factory=dict)
    pending: dict[str, Request] = field(default_factory=dict)
    copies: dict[str, Request] = field(default_factory=dict)
    rebuilding: tuple[str, ...] = ()
    draining: bool = False
    context_tokens: int = 0
    kv_used: int = 0
    time_share: float = 1.0
    weights: ResourceState = field(default_factory=ResourceState)
    kv: ResourceState = field(default_factory=ResourceState)
    outbox: deque[MemoryOp] = field(default_factory=deque)
    in_flight: MemoryOp | None = None
    computing: bool = False
    busy_time: float = 0.0
    retired: bool = False
    idle_since: float | None = None
    cold_start: float = 0.0
    ready_once: bool = False
    ready_at: float | None = None
    _urgency: float | None = None

    @property
    def batch(self) -> int:
        return len(self.requests)

    @property
    def pending_prefill(self) -> list[Request]:
        """Prefill work: waiting prompts and the KV rebuilds of requests migrating in."""
        return list(self.pending.values()) + self.pending_rebuilds

    @property
    def pending_rebuilds(self) -> list[Request]:
        return [r for r in self.copies.values() if not r.copy_ready]

    @property
    def demand(self) -> list[Request]:
        """Requests whose KV the instance holds or will hold (attached and migrating in)."""
        return list(self.requests.values()) + list(self.copies.values())

    @property
    def running(self) -> int:
        """Requests in the decode batch (prefilled)."""
        return len(self.requests) - len(self.pending)

    @property
    def loaded(self) -> bool:
        """Weights in place and not being taken away (optimistic and physical flags, §4.2.3)."""
        return self.weights.physical > 0 and self.weights.target > 0

    @property
    def memory_busy(self) -> bool:
        return self.in_flight is not None or bool(self.outbox)

    def min_deadline(self) -> float:
        """The instance's urgency: the earliest next-token deadline of its requests (§4.2.1),
        migrating-in ones included, so that a rebuild is not starved behind busier neighbours.

        Cached: whoever changes a request's `generated` or `grace` calls `deadlines_changed`.
        """
        if self._urgency is None:
            deadlines = (r.deadline for r in chain(self.requests.values(), self.copies.values()))
            self._urgency = min(deadlines, default=float("inf"))
        return self._urgency

    def deadlines_changed(self) -> None:
        self._urgency = None

    def attach(self, request: Request) -> None:
        request.instance = self
        request.prefilled = False
        self.requests[request.id] = request
        self.pending[request.id] = request
        self.context_tokens += request.context
        self.idle_since = None
        self._urgency = None

    def mark_prefilled(self, request: Request) -> None:
        request.prefilled = True
        del self.pending[request.id]

    def detach(self, request: Request, now: float) -> None:
        del self.requests[request.id]
        self.pending.pop(request.id, None)
        self.context_tokens -= request.context
        self._urgency = None
        request.instance = None
        request.prefilled = False
        if not self.requests:
            self.idle_since = now


@dataclass
class Node:
    spec: NodeSpec
    instances: dict[str, Instance] = field(default_factory=dict)
    grant_instance: Instance | None = None
    grant_end_estimate: float = 0.0
    station: deque[MemoryOp] = field(default_factory=deque)

    @property
    def id(self) -> str:
        return self.spec.node_id

    @property
    def kind(self) -> str:
        return self.spec.kind
