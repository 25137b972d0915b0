"""Where a request goes (SLINFER §4.1, the artifact's `try_schedule`).

In order, the first that passes shadow validation wins:
1. an existing instance of the model (bin-packing order: largest batch first, §4.4.2);
2. proactive preemption: an existing instance that would pass but for a smaller neighbour, which is
   evicted (§4.4.1);
3. a new instance, pool by pool (CPU first, §3.1), nodes most loaded first with empty nodes last,
   one candidate per node (the artifact's "first free slot").
Otherwise the caller queues the request and retries every 0.25 s until its first-token deadline
passes (§4.5).

Invariant: a request is attached at most once per successful call; nothing changes on failure.
"""
from __future__ import annotations

from typing import Sequence

from scheduler import partition
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
                    self.life.preempt(victim, now)
                    self.life.attach(inst, req, now)
                    return inst
        for kind in self.config.pools:
            candidates = [n for n in self.nodes if n.kind == kind and self._has_room(n, model)]
            for node in order_nodes(candidates, self.config.node_order, self.validator):
                inst = self.life.provisional(
                    model, node, self.cost.table(model.profile, node.spec.hardware), now)
                if self.validator.admit(inst, req, now):
                    self.life.create(inst)
                    self.life.attach(inst, req, now)
                    return inst
        return None

    def _has_room(self, node: Node, model: ModelSpec) -> bool:
        return ((model.profile, node.spec.hardware) in self.cost
                and len(node.instances) < partition.instance_cap(model, node.spec, self.config))
