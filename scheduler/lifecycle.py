"""Event-driven instance lifecycle and request bookkeeping (SLINFER §3.1, §4.3.4, §4.4.1, §4.5).

- Create: an instance is created on a node with a LOAD (weights + per-instance overhead) and, where
  KV is fixed, its fixed KV; elastic KV is sized when the first request attaches.
- Attach: a placed request joins the instance and the KV grows early to M_recommend if it falls
  below M_require (watermark, with compromise).
- Detach (finish, cancel, evict): KV shrinks lazily (hysteresis); an instance left empty starts its
  keep-alive (1 s), after which it is reclaimed (scale to zero) unless a request came back.
- Preempt: a victim leaves its model's instance list, its requests are evicted (KV dropped, to be
  re-placed and re-prefilled), and it is unloaded.
- Underestimation: an instance that outgrows its KV grows again if the node's budget allows, else
  evicts its longest-headroom request.
- Cold start: requests that waited for their instance's LOAD and first KV get a TTFT grace equal to
  the measured duration of those actions.
- Failure (not in the paper; a live executor's job raised): the instance is forgotten at once,
  its requests end, the ones it was evicting are placed again.

Invariants: a retired instance takes no new request and is released once its memory is back to
zero and nothing is queued for it; every evicted request is re-queued exactly once.
"""
from __future__ import annotations

import heapq
from typing import Callable

from scheduler import kv as kvsize
from scheduler import partition
from scheduler.actions import (Action, Assign, ColdStartGrace, CreateInstance, Drop,
                               ReleaseInstance)
from scheduler.config import SchedulerConfig
from scheduler.kv import OutputEstimator
from scheduler.memory import MemoryOrchestrator, free_blocks
from scheduler.specs import ModelSpec
from scheduler.state import Instance, Node, Request
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
                 outputs: OutputEstimator, emit: Callable[[Action], None], timers: Timers):
        self.config = config
        self.memory = memory
        self.outputs = outputs
        self.emit = emit
        self.timers = timers
        self.requests: dict[str, Request] = {}
        self.queued: dict[str, Request] = {}
        self.instances: dict[str, Instance] = {}
        self.by_model: dict[str, list[Instance]] = {}
        self._serial = 0

    # -- instances -------------------------------------------------------------------------------

    def provisional(self, model: ModelSpec, node: Node, table, now: float) -> Instance:
        """An instance that does not exist yet, for shadow validation of a new placement."""
        self._serial += 1
        return Instance(f"{model.name}@{node.id}#{self._serial}", model, node, table, now,
                        time_share=partition.time_share(model, node.spec, self.config))

    def create(self, inst: Instance) -> None:
        node, model = inst.node, inst.model
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
        self.by_model[inst.model.name].remove(inst)
        if inst.weights.target:
            self.memory.register(inst, "weights", 0)
        if inst.kv.target:
            self.memory.register(inst, "kv", 0)

    def reclaim_if_idle(self, inst: Instance, idle_since: float) -> None:
        """Keep-alive expired: scale the instance to zero unless it served since (§4.5)."""
        if not inst.retired and not inst.requests and inst.idle_since == idle_since:
            self._retire(inst)

    def preempt(self, victim: Instance, now: float) -> None:
        """Evict every request of `victim` for re-placement, then unload it (§4.4.1)."""
        self._evict(victim, list(victim.requests.values()), now)
        self._retire(victim)

    def fail(self, inst: Instance, ended: tuple[str, ...], now: float) -> list[Request]:
        """The executor lost `inst` (`events.InstanceFailed`): forget it without memory actions,
        end `ended` and whatever is still attached; return the requests it was evicting, to be
        placed again."""
        evictions = self.memory.forget(inst)
        if not inst.retired:
            self._retire(inst)                  # its targets are zero: registers no action
        for rid in (*ended, *inst.requests):
            if (req := self.requests.get(rid)) is not None:
                self._forget(req, now)
        return self.evicted(tuple(rid for op in evictions for rid in op.requests))

    def release_if_drained(self, inst: Instance) -> bool:
        """Forget a retired instance whose memory is back to zero; True if released."""
        if not (inst.retired and not inst.requests and not inst.memory_busy and not inst.computing
                and inst.weights.actual == inst.weights.physical == 0
                and inst.kv.actual == inst.kv.physical == 0
                and not self.memory.waiting_in_station(inst)):
            return False
        del inst.node.instances[inst.id]
        del self.instances[inst.id]
        self.emit(ReleaseInstance(inst.id))
        return True

    def note_memory_done(self, inst: Instance, duration: float) -> None:
        """Accumulate cold-start time; when the instance first becomes ready, grant the grace."""
        if inst.ready_once:
            return
        inst.cold_start += duration
        if inst.loaded and inst.kv.physical > 0:
            inst.ready_once = True
            inst.deadlines_changed()
            for r in inst.requests.values():
                r.grace = inst.cold_start
                self.emit(ColdStartGrace(r.id, inst.cold_start))

    # -- requests ---------------------------------------------------------------------------------

    def attach(self, inst: Instance, req: Request, now: float) -> None:
        self.queued.pop(req.id, None)
        inst.attach(req)
        self.emit(Assign(req.id, inst.id, req.input_tokens, req.generated))
        if partition.fixed_kv_blocks(inst.model, inst.node.spec, self.config) is None:
            required = kvsize.required_blocks(inst.model, inst.requests.values(), self.config,
                                              self.outputs)
            target = kvsize.scale_up_target(inst.kv.target, required, self.config.watermark,
                                            free_blocks(inst.node, inst))
            if target is not None:
                self.memory.register(inst, "kv", target)

    def detach(self, req: Request, now: float) -> None:
        inst = req.instance
        if inst is None:
            return
        inst.detach(req, now)
        if partition.fixed_kv_blocks(inst.model, inst.node.spec, self.config) is None \
                and not inst.retired:
            required = kvsize.required_blocks(inst.model, inst.requests.values(), self.config,
                                              self.outputs)
            target = kvsize.scale_down_target(inst.kv.target, required, self.config.watermark)
            if target is not None:
                self.memory.register(inst, "kv", target)
        if not inst.requests and not inst.retired:
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

    def drop(self, req: Request, reason: str, now: float) -> None:
        self._forget(req, now)
        self.emit(Drop(req.id, reason))

    def _evict(self, inst: Instance, victims: list[Request], now: float) -> None:
        for r in victims:
            if r.prefilled:
                inst.kv_used -= inst.model.blocks_for(r.context)
            self.detach(r, now)
        self.memory.register_evict(inst, tuple(r.id for r in victims))

    def evicted(self, request_ids: tuple[str, ...]) -> list[Request]:
        """An eviction completed: the requests still alive and unplaced, to be placed again."""
        return [r for rid in request_ids
                if (r := self.requests.get(rid)) is not None and r.instance is None
                and rid not in self.queued]

    def guard_kv(self, inst: Instance, now: float) -> None:
        """Underestimation (§4.3.4): grow if the budget allows, else evict longest headroom."""
        fixed = partition.fixed_kv_blocks(inst.model, inst.node.spec, self.config) is not None
        while inst.requests and kv_blocks_needed(inst) > inst.kv.target:
            need = kv_blocks_needed(inst)
            if not fixed and not inst.retired:
                free = free_blocks(inst.node, inst)
                if inst.kv.target + free >= need:
                    required = max(need, kvsize.required_blocks(
                        inst.model, inst.requests.values(), self.config, self.outputs))
                    recommended = kvsize.recommended_blocks(required, self.config.watermark)
                    self.memory.register(inst, "kv", min(recommended, inst.kv.target + free))
                    return
            longest = max(inst.requests.values(), key=lambda r: r.deadline)
            self._evict(inst, [longest], now)
