"""Where a request goes (SLINFER §4.1, the artifact's `try_schedule`).

In order, the first that passes shadow validation wins:
1. an existing instance of the model (bin-packing order: largest batch first, §4.4.2);
2. proactive preemption: an existing instance that would pass but for a smaller neighbour, which is
   evicted (§4.4.1) — or, request by request, migrated live where that is cheaper
   (`migration.py`, with `config.migration`);
3. a new instance, pool by pool (CPU first, §3.1), one candidate per node (the artifact's "first
   free slot"). Within a pool, ServerlessLLM's startup-time-aware choice (§5.1) composes with
   SLINFER's bin-packing order (most loaded first, empty nodes last, §4.4.2) as follows: among the
   pool's nodes that pass shadow validation, take the earliest estimated start-up (`startup.py`:
   queue + bytes ÷ bandwidth of the tier holding the model); nodes within
   `config.startup_tolerance` of it are equal, and the first of them in bin-packing order wins.
   So a node with the model in its host cache beats one that must read it from disk even when
   the latter comes first in packing order, while equal start-ups still pack. Only start-up
   counts, not the prefills queued on a node: every passing node meets the deadline, and ranking
   by queueing would undo packing. Without estimates (no measured bandwidths, or
   `startup_aware` off) this is SLINFER's first fit in packing order. Nodes are validated in
   start-up order and only as far as needed.
4. a new instance where idle instances give way (not in the paper): the first node in pool and
   packing order on which the new instance passes validation once enough of the node's idle
   (kept-alive, requestless) instances are reclaimed, least recently used first, to free the memory
   and the instance slot it needs (`consolidation.idle_to_reclaim`). Idle instances add no decode
   load and no prefill, so only memory and slots are at stake; a keep-alive is a bet that the
   model comes back, and a request waiting now outranks it.
Otherwise the caller queues the request and retries every 0.25 s until its first-token deadline
passes (§4.5).

Invariant: a request is attached at most once per successful call; nothing changes on failure.
"""
from __future__ import annotations

from typing import Sequence

from scheduler import partition
from scheduler.admission import IGNORE_MEMORY, ShadowValidator
from scheduler.config import SchedulerConfig
from scheduler.consolidation import (find_victim, idle_instances, idle_to_reclaim, order_instances,
                                     order_nodes)
from scheduler.costmodel import CostModel
from scheduler.lifecycle import Lifecycle
from scheduler.migration import Migrator
from scheduler.specs import ModelSpec
from scheduler.startup import StartupEstimate, StartupEstimator
from scheduler.state import Instance, Node, Request


class Placement:
    def __init__(self, config: SchedulerConfig, validator: ShadowValidator, lifecycle: Lifecycle,
                 nodes: Sequence[Node], cost: CostModel, startup: StartupEstimator):
        self.config = config
        self.validator = validator
        self.life = lifecycle
        self.nodes = list(nodes)
        self.cost = cost
        self.startup = startup
        self.migrator = Migrator(config, validator, self._elsewhere)
        self._turns: dict[str, int] = {}

    def place(self, req: Request, model: ModelSpec, now: float) -> Instance | None:
        """Attach `req` somewhere and return the instance, or None if nothing passes."""
        turn = self._turns.get(model.name, 0)
        existing = order_instances(self.life.by_model.get(model.name, []),
                                   self.config.instance_order, turn)
        for inst in existing:
            if self.validator.admit(inst, req, now):
                self._turns[model.name] = turn + 1
                self.life.attach(inst, req, now)
                return inst
        if self.config.preemption:
            for inst in existing:
                victim = find_victim(inst, req, now, self.validator)
                if victim is not None:
                    serving = self.life.by_model.get(victim.model.name, [])
                    self.life.preempt(victim, now,
                                      self.migrator.chooser(victim, inst, req, serving, now))
                    self.life.attach(inst, req, now)
                    return inst
        inst = self._new(req, model, now) or self._new_reclaiming_idle(req, model, now)
        if inst is not None:
            self.life.create(inst)
            self.life.attach(inst, req, now)
        return inst

    def _new(self, req: Request, model: ModelSpec, now: float,
             avoid: Node | None = None) -> Instance | None:
        """Step 3: a provisional new instance, pool by pool (never on `avoid`), or None."""
        for kind in self.config.pools:
            candidates = [n for n in self.nodes
                          if n.kind == kind and n is not avoid and self._has_room(n, model)]
            packed = order_nodes(candidates, self.config.node_order, self.validator)
            inst = self._new_instance(packed, model, req, now)
            if inst is not None:
                return inst
        return None

    def _elsewhere(self, req: Request, victim: Instance, now: float) -> Instance | None:
        """A live migration's new destination: where step 3 starts one, off the victim's node."""
        return self._new(req, victim.model, now, avoid=victim.node)

    def _new_instance(self, packed: list[Node], model: ModelSpec, req: Request,
                      now: float) -> Instance | None:
        """The provisional instance chosen among `packed` (bin-packing order), or None."""
        serving = self.life.by_model.get(model.name, [])
        estimates = {n.id: self.startup.estimate(n, model, now, serving) for n in packed}
        passed: dict[str, Instance | None] = {}

        def startup_s(node: Node) -> float:
            estimate = estimates[node.id]
            return estimate.seconds if estimate is not None and self.config.startup_aware \
                else 0.0

        def passing(node: Node) -> Instance | None:
            if node.id not in passed:
                inst = self._provisional(model, node, now, estimates[node.id])
                passed[node.id] = inst if self.validator.admit(inst, req, now) else None
            return passed[node.id]

        earliest = next((n for n in sorted(packed, key=startup_s) if passing(n)), None)
        if earliest is None:
            return None
        limit = startup_s(earliest) + self.config.startup_tolerance
        return next(inst for n in packed if startup_s(n) <= limit and (inst := passing(n)))

    def _new_reclaiming_idle(self, req: Request, model: ModelSpec, now: float) -> Instance | None:
        """Step 4: a provisional new instance for which idle instances are reclaimed, or None."""
        serving = self.life.by_model.get(model.name, [])
        for kind in self.config.pools:
            candidates = [n for n in self.nodes if n.kind == kind and self._runs(n, model)
                          and idle_instances(n)]
            for node in order_nodes(candidates, self.config.node_order, self.validator):
                inst = self._provisional(model, node, now,
                                         self.startup.estimate(node, model, now, serving))
                if (self.validator.outgrows_fixed_kv(inst, req)
                        or not self.validator.admit(inst, req, now, frozenset({IGNORE_MEMORY}))):
                    continue
                slots_gap = len(node.instances) + 1 - partition.instance_cap(
                    model, node.spec, self.config)
                victims = idle_to_reclaim(node, self.validator.memory_overflow(inst, req),
                                          slots_gap)
                if victims is not None:
                    for victim in victims:
                        self.life.reclaim_if_idle(victim, victim.idle_since)
                    return inst
        return None

    def _provisional(self, model: ModelSpec, node: Node, now: float,
                     estimate: StartupEstimate | None) -> Instance:
        return self.life.provisional(model, node, self.cost.table(model.profile, node.spec.hardware),
                                     now, None if estimate is None else now + estimate.seconds)

    def _runs(self, node: Node, model: ModelSpec) -> bool:
        """The cost model knows how `model` runs on `node`'s hardware."""
        return (model.profile, node.spec.hardware) in self.cost

    def _has_room(self, node: Node, model: ModelSpec) -> bool:
        return (self._runs(node, model)
                and len(node.instances) < partition.instance_cap(model, node.spec, self.config))
