"""Hazard-aware memory orchestration of a node (SLINFER §4.3.3, Fig. 18; Tomasulo-like).

Admission plans with the **optimistic budget**: Σ targets (weights + KV), where a shrink counts at
its new size the moment it is registered. Execution is governed by **pessimistic usage**: Σ actuals,
where a shrink still counts at its old size until it completes and a grow counts at its new size
as soon as it is committed (reserved). A grow (load, KV scale-up) commits only if pessimistic usage
+ delta ≤ capacity and nobody is queued before it; otherwise it waits in the node's FIFO
**reservation station**. Shrinks (unload, scale-down) and evictions go straight to the instance;
each completion lowers the actual figure and wakes the station, which commits from the head in
order until one does not fit.

Actions are versioned per (instance, resource): registering a new target bumps the version, and an
older action still waiting (in the station or the instance's outbox) is stale and dropped.

Invariants:
- pessimistic usage ≤ capacity at all times (the Fig. 18 race cannot OOM);
- physical ≤ actual per resource, so the memory really held never exceeds pessimistic usage;
- an instance runs at most one memory action at a time, and only while it holds no grant.
"""
from __future__ import annotations

from scheduler.state import Instance, MemoryOp, Node, Resource, ResourceState


def _bytes(instance: Instance, resource: Resource, value: int) -> int:
    return value if resource == "weights" else value * instance.model.block_bytes


def instance_footprint(instance: Instance, kv_blocks: int | None = None) -> int:
    """Optimistic bytes of one instance (weights target + KV target, or `kv_blocks` instead)."""
    blocks = instance.kv.target if kv_blocks is None else kv_blocks
    return instance.weights.target + blocks * instance.model.block_bytes


def optimistic_budget(node: Node, instance: Instance | None = None, kv_blocks: int = 0) -> int:
    """Σ targets on the node, with `instance` counted at max(target, `kv_blocks`) (§4.3.3)."""
    total = 0
    for inst in node.instances.values():
        blocks = max(inst.kv.target, kv_blocks) if inst is instance else inst.kv.target
        total += instance_footprint(inst, blocks)
    return total


def pessimistic_usage(node: Node) -> int:
    """Σ actuals on the node: memory that is, or may at any moment be, really held."""
    return sum(i.weights.actual + i.kv.actual * i.model.block_bytes
               for i in node.instances.values())


def free_blocks(node: Node, instance: Instance) -> int:
    """KV blocks of `instance`'s size still unclaimed in the node's optimistic budget."""
    free = node.spec.memory_bytes - optimistic_budget(node)
    return max(free, 0) // instance.model.block_bytes


class MemoryOrchestrator:
    """Registers memory actions, reserves them, and hands them to instances in a safe order."""

    def __init__(self) -> None:
        self._next_id = 1

    def _new_op(self, instance: Instance, resource: Resource | None, value: int, version: int,
                requests: tuple[str, ...] = ()) -> MemoryOp:
        op = MemoryOp(self._next_id, instance, resource, value, version, requests)
        self._next_id += 1
        return op

    def register(self, instance: Instance, resource: Resource, value: int) -> None:
        """Set a new target for one resource and queue the action that reaches it."""
        state: ResourceState = getattr(instance, resource)
        state.version += 1
        state.target = value
        op = self._new_op(instance, resource, value, state.version)
        node = instance.node
        if value <= state.actual:
            instance.outbox.append(op)          # within what is reserved: never unsafe
        elif not node.station and self._fits(op):
            self._commit(op)
        else:
            node.station.append(op)

    def register_evict(self, instance: Instance, request_ids: tuple[str, ...]) -> None:
        instance.outbox.append(self._new_op(instance, None, 0, 0, request_ids))

    def _fits(self, op: MemoryOp) -> bool:
        node = op.instance.node
        state: ResourceState = getattr(op.instance, op.resource)
        delta = _bytes(op.instance, op.resource, op.value - state.actual)
        return pessimistic_usage(node) + delta <= node.spec.memory_bytes

    def _commit(self, op: MemoryOp) -> None:
        getattr(op.instance, op.resource).actual = op.value     # reserve before executing
        op.instance.outbox.append(op)

    @staticmethod
    def _stale(op: MemoryOp) -> bool:
        return op.resource is not None and op.version != getattr(op.instance, op.resource).version

    def wake_station(self, node: Node) -> list[Instance]:
        """Commit waiting grows from the head, in order, until one does not fit.

        Returns the instances that received work, so the caller can dispatch to them.
        """
        woken = []
        while node.station:
            op = node.station[0]
            if self._stale(op):
                node.station.popleft()
                continue
            state: ResourceState = getattr(op.instance, op.resource)
            if op.value <= state.actual:
                node.station.popleft()
                op.instance.outbox.append(op)
            elif self._fits(op):
                node.station.popleft()
                self._commit(op)
            else:
                break
            woken.append(op.instance)
        return woken

    def next_dispatch(self, instance: Instance) -> MemoryOp | None:
        """The next action for an idle instance to run (stale and no-op ones are skipped)."""
        while instance.outbox and instance.in_flight is None and not instance.computing:
            op = instance.outbox.popleft()
            if self._stale(op):
                continue
            if op.resource is not None and op.value == getattr(instance, op.resource).physical:
                self._settle(op)
                continue
            instance.in_flight = op
            return op
        return None

    def complete(self, op: MemoryOp) -> None:
        """The executor finished `op`: account it, then let the station retry."""
        op.instance.in_flight = None
        self._settle(op)

    @staticmethod
    def _settle(op: MemoryOp) -> None:
        if op.resource is None:
            return
        state: ResourceState = getattr(op.instance, op.resource)
        state.physical = op.value
        if op.version == state.version:
            state.actual = op.value             # a superseded shrink leaves the reservation alone

    @staticmethod
    def forget(instance: Instance) -> list[MemoryOp]:
        """The executor lost `instance` with its memory: zero its figures and drop its actions (in
        flight, committed, waiting in the station), which will never complete. Returns the dropped
        evictions, whose requests were detached but not yet placed again."""
        dropped = [op for op in (instance.in_flight, *instance.outbox) if op is not None]
        for op in [op for op in instance.node.station if op.instance is instance]:
            instance.node.station.remove(op)
        instance.in_flight = None
        instance.outbox.clear()
        for state in (instance.weights, instance.kv):
            state.version += 1
            state.target = state.actual = state.physical = 0
        return [op for op in dropped if op.resource is None]

    @staticmethod
    def waiting_in_station(instance: Instance) -> bool:
        return any(op.instance is instance for op in instance.node.station)
