"""Event-driven instance lifecycle and request bookkeeping (SLINFER §3.1, §4.3.4, §4.4.1, §4.5).

- Create: an instance is created on a node with a LOAD (weights + per-instance overhead) and, where
  KV is fixed, its fixed KV; elastic KV is sized when the first request attaches.
- Attach: a placed request joins the instance and the KV grows early to M_recommend if it falls
  below M_require (watermark, with compromise).
- Detach (finish, cancel, evict): KV shrinks lazily (hysteresis); an instance left empty starts its
  keep-alive (1 s), after which it is reclaimed (scale to zero) unless a request came back.
- Preempt: a victim leaves its model's instance list, its requests are evicted (KV dropped, to be
  re-placed and re-prefilled), and it is unloaded. With live migration (`migration.py`) the
  requests worth moving are rebuilt on other instances (one created for the move if need be)
  instead while the victim, *draining*, keeps decoding them; each is handed over once rebuilt and
  the source is between grants, and the victim is unloaded when the last one has gone. A request
  that ends or is evicted before its hand-over has its rebuild dropped (an `Evict` on the
  destination).
- Underestimation: an instance that outgrows its KV grows again if the node's budget allows, else
  evicts its longest-headroom request.
- Cold start: a request that waits for its instance's start-up gets a TTFT grace (§4.5
  "cold-start fairness"). With a startup estimate (`startup.py`) the grace is promised at attach —
  the estimated time left until the weights are loaded, so admission, EDF and the SLO plan with
  one deadline from the start — and cut when the load completes early: the grace is
  min(estimate, actual wait), so it never forgives more than the request waited, nor more than
  was promised (a late load counts against the scheduler). Without an estimate the grace is the
  measured duration of the LOAD and first KV actions, as in SLINFER.
- Failure (not in the paper; a live executor's job raised): the instance is forgotten at once,
  its requests end, the ones it was evicting are placed again, the ones migrating into it stay
  at their sources.

Invariants: a retired instance takes no new request and is released once its memory is back to
zero and nothing is queued for it; every evicted request is re-queued exactly once.
"""
from __future__ import annotations

import heapq
from typing import Callable

from scheduler import kv as kvsize
from scheduler import migration, partition
from scheduler.actions import (Action, Assign, ColdStartGrace, CreateInstance, Drop, HandOver,
                               Migrate, ReleaseInstance)
from scheduler.config import SchedulerConfig
from scheduler.kv import OutputEstimator
from scheduler.memory import MemoryOrchestrator, free_blocks
from scheduler.specs import ModelSpec
from scheduler.startup import StartupEstimator, cold_grace
from scheduler.state import Instance, MemoryOp, Node, Request
from scheduler.tokensched import kv_blocks_needed


class Timers:
    """A heap of (time, order, kind, key); stale entries are filtered by whoever pops them."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, float, int, str, str]] = []
        self._seq = 0

    def add(self, when: float, kind: str, key: str, order: float = 0.0) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, order, self._seq, kind, key))

    def due(self, now: float) -> list[tuple[str, str, float]]:
        """Pop every timer due by `now`: (kind, key, order)."""
        out = []
        while self._heap and self._heap[0][0] <= now + 1e-12:
            _, order, _, kind, key = heapq.heappop(self._heap)
            out.append((kind, key, order))
        return out

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None


class Lifecycle:
    def __init__(self, config: SchedulerConfig, memory: MemoryOrchestrator,
                 outputs: OutputEstimator, emit: Callable[[Action], None], timers: Timers,
                 startup: StartupEstimator):
        self.config = config
        self.memory = memory
        self.startup = startup
        self.outputs = outputs
        self.emit = emit
        self.timers = timers
        self.requests: dict[str, Request] = {}
        self.queued: dict[str, Request] = {}
        self.instances: dict[str, Instance] = {}
        self.by_model: dict[str, list[Instance]] = {}
        self.migrating: dict[str, Request] = {}
        self._evicting: dict[str, Instance] = {}
        self.touched: set[str] = set()
        self._serial = 0

    # -- instances -------------------------------------------------------------------------------

    def provisional(self, model: ModelSpec, node: Node, table, now: float,
                    ready_at: float | None = None) -> Instance:
        """An instance that does not exist yet, for shadow validation of a new placement;
        `ready_at` is when its weights are estimated to be loaded, if known."""
        self._serial += 1
        return Instance(f"{model.name}@{node.id}#{self._serial}", model, node, table, now,
                        time_share=partition.time_share(model, node.spec, self.config),
                        ready_at=ready_at)

    def create(self, inst: Instance) -> None:
        node, model = inst.node, inst.model
        self.startup.plan(inst)
        node.instances[inst.id] = inst
        self.instances[inst.id] = inst
        self.by_model.setdefault(model.name, []).append(inst)
        self.emit(CreateInstance(inst.id, node.id, model.name))
        self.memory.register(inst, "weights", partition.weights_bytes(model, node.spec))
        fixed = partition.fixed_kv_blocks(model, node.spec, self.config)
        if fixed is not None:
            self.memory.register(inst, "kv", fixed)

    def _retire(self, inst: Instance) -> None:
        inst.retired = True
        if not inst.draining:
            self.by_model[inst.model.name].remove(inst)
        if inst.weights.target:
            self.memory.register(inst, "weights", 0)
        if inst.kv.target:
            self.memory.register(inst, "kv", 0)
        self._regrow(inst.node)

    def _regrow(self, node: Node) -> None:
        """Memory was given back on `node`: grow each instance there whose next iteration needs
        more KV than its target. It gets no grant until it grows, so no step of its own would
        (`guard_kv`): a preempting instance whose victim drained its requests away by live
        migration waited for this memory."""
        for inst in node.instances.values():
            if not inst.retired and kv_blocks_needed(inst) > inst.kv.target:
                self._grow_kv(inst)

    def reclaim_if_idle(self, inst: Instance, idle_since: float) -> None:
        """Keep-alive expired: scale the instance to zero unless it served since (§4.5)."""
        if (not inst.retired and not inst.requests and not inst.copies
                and inst.idle_since == idle_since):
            self._retire(inst)

    def preempt(self, victim: Instance, now: float,
                destination: Callable[[Request], Instance | None] | None = None) -> None:
        """Evict every request of `victim` for re-placement, then unload it (§4.4.1) — except
        those `destination` sends elsewhere live, most urgent first, which the victim keeps
        decoding, draining, until their hand-over."""
        if destination is not None:
            for r in sorted(victim.requests.values(), key=lambda r: r.deadline):
                dest = destination(r)
                if dest is not None:
                    self._migrate(r, dest)
        staying = [r for r in victim.requests.values() if r.copy_at is None]
        if len(staying) == victim.batch:
            self._evict(victim, staying, now)
            self._retire(victim)
            return
        self.by_model[victim.model.name].remove(victim)
        victim.draining = True
        if staying:
            self._evict(victim, staying, now)

    def fail(self, inst: Instance, ended: tuple[str, ...], now: float) -> list[Request]:
        """The executor lost `inst` (`events.InstanceFailed`): forget it without memory actions,
        end `ended` and whatever is still attached; return the requests it was evicting, to be
        placed again."""
        evictions = self.memory.forget(inst)
        if not inst.retired:
            self._retire(inst)                  # its targets are zero: registers no action
        for req in list(inst.copies.values()):
            self._forget_copy(req)              # those requests carry on at their sources
        for rid in (*ended, *inst.requests):
            if (req := self.requests.get(rid)) is not None:
                self._forget(req, now)
        return self.evicted(inst, tuple(rid for op in evictions for rid in op.requests))

    def release_if_drained(self, inst: Instance) -> bool:
        """Forget a retired instance whose memory is back to zero; True if released."""
        if not (inst.retired and not inst.requests and not inst.memory_busy and not inst.computing
                and inst.weights.actual == inst.weights.physical == 0
                and inst.kv.actual == inst.kv.physical == 0
                and not self.memory.waiting_in_station(inst)):
            return False
        del inst.node.instances[inst.id]
        del self.instances[inst.id]
        self.startup.finished(inst)
        self.emit(ReleaseInstance(inst.id))
        return True

    def note_memory_done(self, inst: Instance, op: MemoryOp, duration: float,
                         now: float) -> None:
        """Track the cold start; when the instance first becomes ready, grant the grace."""
        if inst.ready_once:
            return
        inst.cold_start += duration
        if inst.ready_at is not None and op.resource == "weights" and op.value > 0:
            early = max(0.0, inst.ready_at - now)
            for r in inst.requests.values():
                r.grace = max(0.0, r.grace - early)
            inst.ready_at = now
            self.startup.finished(inst)
        if inst.loaded and inst.kv.physical > 0:
            inst.ready_once = True
            inst.deadlines_changed()
            for r in inst.requests.values():
                if inst.ready_at is None:
                    r.grace = inst.cold_start
                self.emit(ColdStartGrace(r.id, r.grace))

    # -- live migration ---------------------------------------------------------------------------

    def _migrate(self, req: Request, dest: Instance) -> None:
        if dest.id not in self.instances:       # a new destination: it loads while r streams on
            self.create(dest)
        dest.copies[req.id] = req
        req.copy_at = dest
        self.migrating[req.id] = req
        dest.deadlines_changed()
        self._grow_kv(dest)
        self.touched.add(dest.node.id)
        self.emit(Migrate(req.id, req.instance.id, dest.id))

    def rebuilt(self, inst: Instance) -> None:
        """A prefill step of `inst` ran: the rebuilds its grant covered are done, or take another
        round if their sources have since run too far ahead (`migration.caught_up`)."""
        for rid in inst.rebuilding:
            if (r := inst.copies.get(rid)) is not None:
                r.copy_ready = migration.caught_up(r, self.config)
        inst.rebuilding = ()

    def hand_over_ready(self, now: float) -> None:
        """Hand over every rebuilt request whose source is between grants and memory actions."""
        for req in [r for r in self.migrating.values() if r.copy_ready]:
            src, dest = req.instance, req.copy_at
            if src.computing or src.in_flight is not None:
                continue
            self._forget_copy(req)
            src.kv_used -= src.model.blocks_for(req.context)
            self._leave(req, now)
            dest.attach(req)
            dest.mark_prefilled(req)
            self.touched |= {src.node.id, dest.node.id}
            self.emit(HandOver(req.id, src.id, dest.id))

    def _forget_copy(self, req: Request) -> Instance:
        dest = req.copy_at
        del dest.copies[req.id]
        del self.migrating[req.id]
        req.copy_at, req.copy_ready, req.copy_rounds, req.copy_sent = None, False, 0, 0
        dest.deadlines_changed()
        return dest

    def _drop_copy(self, req: Request, now: float) -> None:
        """The request left its source before the hand-over: its rebuild is dropped."""
        if req.copy_at is None:
            return
        dest = self._forget_copy(req)
        self.memory.register_evict(dest, (req.id,))
        self._shrink_kv(dest)
        self._settle(dest, now)
        self.touched.add(dest.node.id)

    # -- requests ---------------------------------------------------------------------------------

    def attach(self, inst: Instance, req: Request, now: float) -> None:
        self.queued.pop(req.id, None)
        grace = cold_grace(inst, now)
        if grace is not None:
            req.grace = grace
        inst.attach(req)
        self.emit(Assign(req.id, inst.id, req.input_tokens, req.generated))
        self._grow_kv(inst)

    def _grow_kv(self, inst: Instance) -> None:
        """KV grows early to M_recommend once below M_require (watermark, §4.3.2)."""
        if partition.fixed_kv_blocks(inst.model, inst.node.spec, self.config) is None:
            required = kvsize.required_blocks(inst.model, inst.demand, self.config, self.outputs)
            target = kvsize.scale_up_target(inst.kv.target, required, self.config.watermark,
                                            free_blocks(inst.node, inst))
            if target is not None:
                self.memory.register(inst, "kv", target)

    def _shrink_kv(self, inst: Instance) -> None:
        """KV shrinks lazily, past the watermark's hysteresis (§4.3.2)."""
        if partition.fixed_kv_blocks(inst.model, inst.node.spec, self.config) is None \
                and not inst.retired:
            required = kvsize.required_blocks(inst.model, inst.demand, self.config, self.outputs)
            target = kvsize.scale_down_target(inst.kv.target, required, self.config.watermark)
            if target is not None:
                self.memory.register(inst, "kv", target)

    def detach(self, req: Request, now: float) -> None:
        """The request leaves for good (finished, cancelled, evicted, dropped)."""
        self._drop_copy(req, now)
        self._leave(req, now)

    def _leave(self, req: Request, now: float) -> None:
        inst = req.instance
        if inst is None:
            return
        inst.detach(req, now)
        self._shrink_kv(inst)
        self._settle(inst, now)

    def _settle(self, inst: Instance, now: float) -> None:
        """An instance left with nothing: a draining one is retired, others start keep-alive."""
        if inst.retired or inst.requests or inst.copies:
            return
        if inst.draining:
            self._retire(inst)
        else:
            self.timers.add(now + self.config.keep_alive, "reclaim", inst.id, inst.idle_since)

    def enqueue(self, req: Request, now: float) -> None:
        """Wait for a retry (every `retry_interval`, §4.1 step 4)."""
        self.queued[req.id] = req
        req.retry_at = now + self.config.retry_interval
        self.timers.add(req.retry_at, "retry", req.id, req.arrival)

    def _forget(self, req: Request, now: float) -> None:
        self.detach(req, now)
        self.requests.pop(req.id, None)
        self.queued.pop(req.id, None)

    def finish(self, req: Request, now: float) -> None:
        self._forget(req, now)
        self.outputs.observe(req.model, req.generated)

    def cancel(self, req: Request, now: float) -> None:
        """Its client left: forgotten like a finished request, but its length so far says nothing
        of the model's output lengths, so the estimate does not learn from it."""
        self._forget(req, now)

    def drop(self, req: Request, reason: str, now: float) -> None:
        self._forget(req, now)
        self.emit(Drop(req.id, reason))

    def _evict(self, inst: Instance, victims: list[Request], now: float) -> None:
        for r in victims:
            if r.prefilled:
                inst.kv_used -= inst.model.blocks_for(r.context)
            self.detach(r, now)
            self._evicting[r.id] = inst
        self.memory.register_evict(inst, tuple(r.id for r in victims))

    def evicted(self, inst: Instance, request_ids: tuple[str, ...]) -> list[Request]:
        """An eviction from `inst` completed: the requests it evicted that are still alive and
        unplaced, to be placed again (a dropped rebuild places nothing: its request has not
        left its source yet, or has ended)."""
        out = []
        for rid in request_ids:
            if self._evicting.get(rid) is not inst:
                continue
            del self._evicting[rid]
            r = self.requests.get(rid)
            if r is not None and r.instance is None and rid not in self.queued:
                out.append(r)
        return out

    def guard_kv(self, inst: Instance, now: float) -> None:
        """Underestimation (§4.3.4): grow if the budget allows, else evict longest headroom."""
        if inst.draining:
            return      # it only loses requests; the engine's count lags the evictions it owes
        fixed = partition.fixed_kv_blocks(inst.model, inst.node.spec, self.config) is not None
        while inst.requests and kv_blocks_needed(inst) > inst.kv.target:
            need = kv_blocks_needed(inst)
            if not fixed and not inst.retired:
                free = free_blocks(inst.node, inst)
                if inst.kv.target + free >= need:
                    required = max(need, kvsize.required_blocks(
                        inst.model, inst.demand, self.config, self.outputs))
                    recommended = kvsize.recommended_blocks(required, self.config.watermark)
                    self.memory.register(inst, "kv", min(recommended, inst.kv.target + free))
                    return
            longest = max(inst.requests.values(), key=lambda r: r.deadline)
            self._evict(inst, [longest], now)
