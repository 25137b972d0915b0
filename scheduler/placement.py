"""Where a request goes (SLINFER §4.1, the artifact's `try_schedule`).

In order, the first that passes shadow validation wins:
1. an existing instance of the model (bin-packing order: largest batch first, §4.4.2);
2. proactive preemption: an existing instance that would pass but for a smaller neighbour, which is
   evicted (§4.4.1) — with `config.migration`, each of the neighbour's running requests that can
   go elsewhere (an existing instance or a new one, on another node) is live-migrated there
   instead, where `migration.py` finds that cheaper than dropping and re-prefilling it;
3. a new instance, pool by pool (CPU first, §3.1), nodes most loaded first with empty nodes last,
   one candidate per node (the artifact's "first free slot").
Otherwise the caller queues the request and retries every 0.25 s until its first-token deadline
passes (§4.5).

Invariant: a request is attached at most once per successful call; nothing changes on failure.
"""
from __future__ import annotations

from typing import Sequence

from scheduler import migration, partition
from scheduler.admission import ShadowValidator
from scheduler.config import SchedulerConfig
from scheduler.consolidation import find_victim, order_instances, order_nodes
from scheduler.costmodel import CostModel
from scheduler.lifecycle import Lifecycle
from scheduler.specs import ModelSpec
from scheduler.state import Instance, Node, Request


class Placement:
    def __init__(self, config: SchedulerConfig, validator: ShadowValidator, lifecycle: Lifecycle,
                 nodes: Sequence[Node], cost: CostModel):
        self.config = config
        self.validator = validator
        self.life = lifecycle
        self.nodes = list(nodes)
        self.cost = cost
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
                    self._preempt(victim, inst, req, now)
                    self.life.attach(inst, req, now)
                    return inst
        inst = self._new_instance(req, model, now)
        if inst is not None:
            self.life.create(inst)
            self.life.attach(inst, req, now)
        return inst

    def _new_instance(self, req: Request, model: ModelSpec, now: float,
                      avoid: Node | None = None) -> Instance | None:
        """A provisional instance for `req` on the first node, pool by pool in packing order, that
        passes validation (never on `avoid`), or None."""
        for kind in self.config.pools:
            candidates = [n for n in self.nodes
                          if n.kind == kind and n is not avoid and self._has_room(n, model)]
            for node in order_nodes(candidates, self.config.node_order, self.validator):
                inst = self.life.provisional(
                    model, node, self.cost.table(model.profile, node.spec.hardware), now)
                if self.validator.admit(inst, req, now):
                    return inst
        return None

    def _preempt(self, victim: Instance, target: Instance, req: Request, now: float) -> None:
        """Free `victim`'s share of the node for `req` on `target` (§4.4.1): its running requests
        move by live migration where that beats re-prefilling them, the rest are evicted."""
        if self.config.migration:
            est = self.validator.est
            for running in [r for r in victim.requests.values() if r.prefilled]:
                dest = self._migration_target(running, victim, now)
                moving = dest and migration.plan(running, victim, dest, est, self.config)
                if migration.beats_reprefill(moving, req, target, now, est):
                    if dest.id not in self.life.instances:
                        self.life.create(dest)
                    self.life.migrate(running, dest)
        self.life.preempt(victim, now)

    def _migration_target(self, req: Request, source: Instance, now: float) -> Instance | None:
        """Where a request leaving `source`'s node could run: the first instance of its model
        elsewhere that admits it (packing order), else a new one; nothing is attached or created."""
        model = source.model
        others = [i for i in self.life.by_model.get(model.name, []) if i.node is not source.node]
        for inst in order_instances(others, self.config.instance_order):
            if self.validator.admit(inst, req, now):
                return inst
        return self._new_instance(req, model, now, avoid=source.node)

    def _has_room(self, node: Node, model: ModelSpec) -> bool:
        return ((model.profile, node.spec.hardware) in self.cost
                and len(node.instances) < partition.instance_cap(model, node.spec, self.config))
