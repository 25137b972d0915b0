"""The scheduler object both executors drive: `handle(event, now) -> list[Action]`.

It owns the cluster state and wires the mechanisms together: placement with shadow validation
(§4.1, §4.2.4), the per-node token scheduler (§4.2.3), the memory orchestrator (§4.3.3), the
consolidator (§4.4) and the lifecycle (§4.5). It never reads a clock, sleeps or does I/O: `now`
comes with every event, and `next_wakeup()` says when it wants a `Tick` (keep-alive expiry, a
placement retry, the end of a static time-share pause).

Invariants (checked by the property tests):
- at most one grant per node is live;
- pessimistic memory usage of every node ≤ its capacity;
- every request ends exactly once: finished (the executor says so), cancelled, or dropped with a
  reason; an evicted request is re-placed, never lost.
"""
from __future__ import annotations

from typing import Iterable

from scheduler.actions import Action, Evict, KvResize, Load, Unload
from scheduler.admission import ShadowValidator
from scheduler.config import SchedulerConfig
from scheduler.costmodel import CostModel
from scheduler.estimate import Estimator
from scheduler.events import (Event, HandedOver, InstanceFailed, MemoryDone, ModelTierChanged,
                              RequestArrived, RequestCancelled, StepFinished, Tick)
from scheduler.kv import OutputEstimator
from scheduler.lifecycle import Lifecycle, Timers
from scheduler.memory import MemoryOrchestrator
from scheduler.placement import Placement
from scheduler.specs import ModelSpec, NodeSpec
from scheduler.startup import StartupEstimator
from scheduler.state import Instance, MemoryOp, Node, Request
from scheduler.tokensched import TokenScheduler


class Scheduler:
    """SLINFER (or a baseline preset) over a fixed set of nodes and models."""

    def __init__(self, models: Iterable[ModelSpec], nodes: Iterable[NodeSpec], cost: CostModel,
                 config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()
        self.models = {m.name: m for m in models}
        self.nodes = {n.node_id: Node(n) for n in nodes}
        self.cost = cost
        self._out: list[Action] = []
        self.timers = Timers()
        self.memory = MemoryOrchestrator()
        self.estimator = Estimator(self.config)
        outputs = OutputEstimator(self.config.output_prior)
        self.validator = ShadowValidator(self.config, self.estimator, outputs)
        self.startup = StartupEstimator()
        self.life = Lifecycle(self.config, self.memory, outputs, self._out.append, self.timers,
                              self.startup)
        self.placement = Placement(self.config, self.validator, self.life,
                                   list(self.nodes.values()), cost, self.startup)
        self.tokens = TokenScheduler(self.estimator)
        self._touched: set[str] = set()
        self._share_timers: dict[str, float] = {}

    # -- public API --------------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Action]:
        """Apply one event at time `now`; return the actions to carry out, in order."""
        self._out.clear()
        self._touched.clear()
        self.life.touched.clear()
        if isinstance(event, StepFinished):
            self._step_finished(event, now)
        elif isinstance(event, HandedOver):
            self._handed_over(event, now)
        elif isinstance(event, MemoryDone):
            self._memory_done(event, now)
        elif isinstance(event, RequestArrived):
            self._arrived(event, now)
        elif isinstance(event, RequestCancelled):
            self._cancelled(event, now)
        elif isinstance(event, InstanceFailed):
            self._instance_failed(event, now)
        elif isinstance(event, Tick):
            self._tick(now)
        elif isinstance(event, ModelTierChanged):
            self.startup.tier_changed(event.host, event.model, event.tier)
        else:
            raise TypeError(f"unknown event {event!r}")
        if self.life.migrating:
            self.life.hand_over_ready(now)
        self._touched |= self.life.touched
        for node_id in sorted(self._touched) if len(self._touched) > 1 else self._touched:
            self._pump(self.nodes[node_id], now)
        return list(self._out)

    def next_wakeup(self) -> float | None:
        """Earliest time a `Tick` is wanted, or None."""
        return self.timers.next_time()

    @property
    def requests(self) -> dict[str, Request]:
        """Live requests (queued, attached or being evicted), by id."""
        return self.life.requests

    # -- events ------------------------------------------------------------------------------------

    def _arrived(self, ev: RequestArrived, now: float) -> None:
        if ev.request_id in self.life.requests:
            raise ValueError(f"duplicate request id {ev.request_id!r}")
        req = Request(ev.request_id, ev.model, ev.input_tokens, ev.max_output_tokens, ev.arrival,
                      *self._internal_slos(ev))
        self.life.requests[req.id] = req
        if ev.model not in self.models:
            self.life.drop(req, "unknown model", now)
            return
        self._try_place(req, now)

    def _internal_slos(self, ev: RequestArrived) -> tuple[float, float]:
        """(TTFT, TPOT) the scheduler plans with: the request's own SLOs where it gave them, else the
        policy's; both shrunk by the same margin (§4.2.1), so an override of exactly the default
        SLO schedules exactly like no override. They set the request's deadlines (token priority,
        prefill EDF check, drops); the decode-throughput check (b) keeps the policy's TPOT, one
        figure per node as in the paper."""
        slo = self.config.slo
        keep = 1.0 - slo.margin
        ttft = slo.ttft(ev.input_tokens) if ev.ttft_slo is None else ev.ttft_slo * keep
        tpot = slo.tpot_slo if ev.tpot_slo is None else ev.tpot_slo * keep
        return ttft, tpot

    def _try_place(self, req: Request, now: float) -> None:
        inst = self.placement.place(req, self.models[req.model], now)
        if inst is not None:
            self._touched.add(inst.node.id)
        elif now > req.deadline:
            self.life.drop(req, "first-token deadline passed while queued", now)
        else:
            self.life.enqueue(req, now)

    def _ran(self, instance_id: str, elapsed: float, kv_blocks_used: int) -> Instance | None:
        """`instance_id` computed for `elapsed` s and now holds `kv_blocks_used` blocks; None if
        it is gone."""
        inst = self.life.instances.get(instance_id)
        if inst is not None:
            inst.busy_time += elapsed
            inst.kv_used = kv_blocks_used
            self._touched.add(inst.node.id)
        return inst

    def _step_finished(self, ev: StepFinished, now: float) -> None:
        inst = self._ran(ev.instance, ev.elapsed, ev.kv_blocks_used)
        if inst is None:
            return
        requests = self.life.requests
        if ev.kind == "decode" and ev.sequences:
            stepped = [requests[rid] for rid in ev.sequences if rid in requests]
            self.estimator.observe_decode(inst, len(stepped), sum(r.context for r in stepped),
                                          ev.elapsed)
        self._tokens_made(inst, ev.sequences, ev.finished, now)
        if ev.kind == "prefill":
            self.life.rebuilt(inst)
        if ev.grant_done and inst.node.grant_instance is inst:
            self.tokens.release(inst.node)
        self.life.guard_kv(inst, now)

    def _handed_over(self, ev: HandedOver, now: float) -> None:
        """The catch-up of a hand-over ran on the destination: like a step's, without a grant."""
        inst = self._ran(ev.instance, ev.elapsed, ev.kv_blocks_used)
        if inst is None:
            return
        self._tokens_made(inst, (ev.request_id,) if ev.produced else (),
                          (ev.request_id,) if ev.finished else (), now)
        self.life.guard_kv(inst, now)

    def _tokens_made(self, inst: Instance, sequences: tuple[str, ...], finished: tuple[str, ...],
                     now: float) -> None:
        """`inst` made the next token of each of `sequences`; `finished` ended there."""
        requests = self.life.requests
        inst.deadlines_changed()
        for rid in sequences:
            req = requests.get(rid)
            if req is None:
                continue
            req.generated += 1
            if req.copy_at is not None:
                req.copy_at.deadlines_changed()
            if req.instance is inst:
                inst.context_tokens += 1
                if not req.prefilled:
                    inst.mark_prefilled(req)
            elif req.instance is not None:
                req.instance.deadlines_changed()
        for rid in finished:
            req = requests.get(rid)
            if req is not None:
                self.life.finish(req, now)

    def _memory_done(self, ev: MemoryDone, now: float) -> None:
        inst = self.life.instances.get(ev.instance)
        op = inst.in_flight if inst is not None else None
        if op is None or op.op_id != ev.action_id:
            raise ValueError(f"MemoryDone for action {ev.action_id}, which {ev.instance} "
                             "is not running")
        self.memory.complete(op)
        self.life.note_memory_done(inst, op, ev.duration, now)
        if op.resource is None:
            inst.kv_used = sum(inst.model.blocks_for(r.context) for r in inst.requests.values()
                               if r.prefilled)
            for req in self.life.evicted(inst, op.requests):
                self._try_place(req, now)
        self.memory.wake_station(inst.node)
        self._touched.add(inst.node.id)

    def _cancelled(self, ev: RequestCancelled, now: float) -> None:
        """The executor aborted the request (its KV freed with it) and reports no step for that:
        its blocks leave the instance's count here, as an eviction's do. Every step the executor
        measured before the abort was reported before this event; one after it counts them no
        more. Left in, they would hold the count above the truth until the instance's next step,
        which a next request needing that room would then never get."""
        req = self.life.requests.get(ev.request_id)
        if req is not None:
            inst = req.instance
            if inst is not None and req.prefilled:
                inst.kv_used = max(0, inst.kv_used - inst.model.blocks_for(req.context))
            self.life.cancel(req, now)
            if inst is not None:
                self._touched.add(inst.node.id)

    def _instance_failed(self, ev: InstanceFailed, now: float) -> None:
        inst = self.life.instances.get(ev.instance)
        if inst is None:
            return
        if inst.node.grant_instance is inst:
            self.tokens.release(inst.node)
        evicted = self.life.fail(inst, ev.requests, now)
        self.life.release_if_drained(inst)
        for req in evicted:
            self._try_place(req, now)
        self.memory.wake_station(inst.node)     # its reservations are gone: others may fit now
        self._touched.add(inst.node.id)

    def _tick(self, now: float) -> None:
        for kind, key, tag in self.timers.due(now):
            if kind == "retry":
                req = self.life.queued.get(key)
                if req is not None and req.retry_at <= now + 1e-12:
                    del self.life.queued[key]
                    self._try_place(req, now)
            elif kind == "reclaim":
                inst = self.life.instances.get(key)
                if inst is not None:
                    self.life.reclaim_if_idle(inst, tag)
                    self._touched.add(inst.node.id)
            elif kind == "share":
                self._share_timers.pop(key, None)
                self._touched.add(key)

    # -- per node ----------------------------------------------------------------------------------

    def _pump(self, node: Node, now: float) -> None:
        """Hand out committed memory actions, grant the permit, release drained instances."""
        for inst in list(node.instances.values()):
            op = self.memory.next_dispatch(inst)
            if op is not None:
                self._out.append(self._memory_action(op))
            self.life.release_if_drained(inst)
        grant = self.tokens.grant(node, now)
        if grant is not None:
            self._out.append(grant)
        elif node.grant_instance is None:
            wake = self.tokens.share_wakeup(node, now)
            if wake is not None and self._share_timers.get(node.id) != wake:
                self._share_timers[node.id] = wake
                self.timers.add(wake, "share", node.id)

    @staticmethod
    def _memory_action(op: MemoryOp) -> Action:
        iid = op.instance.id
        if op.resource is None:
            return Evict(op.op_id, iid, op.requests)
        if op.resource == "weights":
            return Load(op.op_id, iid) if op.value else Unload(op.op_id, iid)
        return KvResize(op.op_id, iid, op.value, op.instance.kv.physical)
