"""Efficiency-oriented consolidation (SLINFER §4.4): which instance or node first, whom to preempt.

Reactive bin-packing (§4.4.2): a request tries its model's instances largest batch first, so big
instances grow and small ones drain and get reclaimed; a new instance goes to the most loaded node
that passes validation (CPU nodes ranked by Σ decode time-slices, GPU nodes by optimistic memory
budget), nodes holding no instance last. Without consolidation both orders are reversed into load
balancing; sllm rotates round-robin over a model's instances.

Proactive preemption (§4.4.1): an instance blocked only by its neighbours may evict one neighbour
with a *smaller* batch, smallest first — on a GPU the first whose memory footprint covers the
memory gap, on a CPU the first whose decode time-slice covers the compute gap.

Idle instances give way (not in the paper): an instance kept alive with no request holds memory
and an instance slot only in case its model comes back; a new instance that needs them now takes
them, least recently used first (`idle_to_reclaim`), instead of waiting out their keep-alive.

Invariant: these functions only read state and rank; `placement.py` acts on their answers.
"""
from __future__ import annotations

from typing import Sequence

from scheduler.admission import IGNORE_DECODE, IGNORE_MEMORY, ShadowValidator
from scheduler.config import Order
from scheduler.memory import instance_footprint, optimistic_budget
from scheduler.state import Instance, Node, Request


def order_instances(instances: Sequence[Instance], order: Order, turn: int = 0) -> list[Instance]:
    """A model's instances in the order placement tries them (CPU first on ties, §9 row 9)."""
    if order == "round_robin":
        k = turn % len(instances) if instances else 0
        return list(instances[k:]) + list(instances[:k])
    sign = -1 if order == "pack" else 1
    return sorted(instances, key=lambda i: (sign * i.batch, i.node.kind != "cpu"))


def node_load(node: Node, validator: ShadowValidator) -> float:
    if node.kind == "cpu":
        return validator.decode_load(node)
    return float(optimistic_budget(node))


def order_nodes(nodes: Sequence[Node], order: Order, validator: ShadowValidator) -> list[Node]:
    """Nodes for a new instance: most loaded first, empty last ("pack"), or the reverse."""
    loads = {n.id: node_load(n, validator) for n in nodes}
    if order == "pack":
        return sorted(nodes, key=lambda n: (not n.instances, -loads[n.id]))
    return sorted(nodes, key=lambda n: (bool(n.instances), loads[n.id]))


def _smaller_neighbours(target: Instance) -> list[Instance]:
    others = [i for i in target.node.instances.values()
              if i is not target and not i.retired and not i.draining and not i.copies
              and i.batch < target.batch]
    return sorted(others, key=lambda i: i.batch)


def find_victim(target: Instance, request: Request, now: float,
                validator: ShadowValidator) -> Instance | None:
    """The neighbour whose preemption lets `target` take `request`, if any (§4.4.1)."""
    node = target.node
    if node.kind == "gpu":
        if not validator.admit(target, request, now, frozenset({IGNORE_MEMORY})):
            return None
        gap = validator.memory_overflow(target, request)
        if gap <= 0:
            return None
        for victim in _smaller_neighbours(target):
            if victim.weights.target > 0 and instance_footprint(victim) >= gap:
                return victim
        return None
    if not validator.admit(target, request, now, frozenset({IGNORE_DECODE})):
        return None
    gap = validator.decode_load(node, target, request) - 1.0
    if gap <= 0 or validator.est.time_slice(target, request) > 1.0:
        return None
    for victim in _smaller_neighbours(target):
        if victim.batch > 0 and validator.est.time_slice(victim) >= gap:
            return victim
    return None


def idle_instances(node: Node) -> list[Instance]:
    """The node's instances kept alive with nothing to do, least recently used first."""
    idle = [i for i in node.instances.values()
            if not i.retired and not i.draining and not i.requests and not i.copies
            and i.idle_since is not None]
    return sorted(idle, key=lambda i: i.idle_since)


def idle_to_reclaim(node: Node, memory_gap: int, slots_gap: int) -> list[Instance] | None:
    """The fewest least-recently-used idle instances whose going frees `memory_gap` bytes and
    `slots_gap` instance slots, or None if all of them would not."""
    chosen: list[Instance] = []
    freed = 0
    for inst in idle_instances(node):
        if freed >= memory_gap and len(chosen) >= slots_gap:
            break
        chosen.append(inst)
        freed += instance_footprint(inst)
    return chosen if freed >= memory_gap and len(chosen) >= slots_gap else None
