"""Shadow validation: may request R join instance I on node N without breaking an SLO? (§4.2.4)

R is virtually attached to I and three things are checked (the artifact's `can_add`):
(a) memory: I's KV demand with R fits — within a fixed KV size, or within the node's optimistic
    budget when I grows to its *minimal* demand M_require (compromise, §4.3.4);
(b) decode throughput (failure case 3): Σ over the node's instances of one decode iteration /
    TPOT_SLO ≤ 1, i.e. every instance can still emit a token per TPOT if they take turns;
(c) prefill deadlines (failure cases 1 and 2): an EDF walk over the node's pending prefills, from
    the end of the running grant, must meet R's first-token deadline and every deadline queued
    after R; misses queued before R are pre-existing and ignored. With `config.shadow == "full"`
    (c) is instead an event simulation of the node's future that also interleaves decode
    iterations (`shadowsim.py`, §9 row 3).
    A cold target with a startup estimate (`startup.py`) cannot prefill before its weights are
    estimated to be loaded: its prefill is *released* then, the node's other prefills run in the
    gap, and R's deadline carries the grace it would be promised (the estimated wait). Other
    instances still loading are ignored, as in the artifact; without an estimate a cold target's
    load is not modelled and the grace measured later covers it (SLINFER).

Baselines admit by a per-instance concurrency limit instead, plus the same memory check.
Invariant: validation only reads state; a provisional (not yet created) instance may be passed.
"""
from __future__ import annotations

from typing import Iterable

from scheduler import partition
from scheduler.config import SchedulerConfig
from scheduler.estimate import Estimator
from scheduler.kv import OutputEstimator, required_blocks
from scheduler.memory import optimistic_budget
from scheduler.shadowsim import simulate_node
from scheduler.startup import cold_grace
from scheduler.state import Instance, Node, Request

IGNORE_MEMORY = "memory"
IGNORE_DECODE = "decode"


def node_instances(node: Node, target: Instance) -> Iterable[Instance]:
    """The node's instances, including `target` even if it is still provisional."""
    yield from node.instances.values()
    if target.id not in node.instances:
        yield target


class ShadowValidator:
    def __init__(self, config: SchedulerConfig, estimator: Estimator, outputs: OutputEstimator):
        self.config = config
        self.est = estimator
        self.outputs = outputs

    def admit(self, target: Instance, request: Request, now: float,
              ignore: frozenset[str] = frozenset()) -> bool:
        if self.config.admission == "concurrency":
            limit = self.config.concurrency_limit(target.model.profile, target.node.kind)
            return target.batch < limit and (IGNORE_MEMORY in ignore
                                             or self.memory_ok(target, request))
        if IGNORE_MEMORY not in ignore and not self.memory_ok(target, request):
            return False
        if IGNORE_DECODE not in ignore and self.decode_load(target.node, target, request) > 1.0:
            return False
        return self.prefill_ok(target, request, now)

    def required_with(self, target: Instance, request: Request | None) -> int:
        """M_require of `target` in blocks with `request` attached (§4.3.1)."""
        requests = target.demand
        if request is not None:
            requests.append(request)
        return required_blocks(target.model, requests, self.config, self.outputs)

    def memory_overflow(self, target: Instance, request: Request | None) -> int:
        """Bytes by which the node's optimistic budget would exceed capacity (≤ 0: fits, (a))."""
        node, model = target.node, target.model
        required = self.required_with(target, request)
        fixed = partition.fixed_kv_blocks(model, node.spec, self.config)
        if fixed is not None and required > fixed:
            return model.block_bytes * (required - fixed)
        blocks = fixed if fixed is not None else required
        if target.id in node.instances:
            budget = optimistic_budget(node, target, blocks)
        else:
            budget = (optimistic_budget(node) + partition.weights_bytes(model, node.spec)
                      + blocks * model.block_bytes)
        return budget - node.spec.memory_bytes

    def outgrows_fixed_kv(self, target: Instance, request: Request | None) -> bool:
        """`target`'s KV is fixed in size and too small with `request`: no neighbour's memory helps."""
        fixed = partition.fixed_kv_blocks(target.model, target.node.spec, self.config)
        return fixed is not None and self.required_with(target, request) > fixed

    def memory_ok(self, target: Instance, request: Request) -> bool:
        return self.memory_overflow(target, request) <= 0

    def decode_load(self, node: Node, target: Instance | None = None,
                    request: Request | None = None) -> float:
        """Σ decode time-slices on the node, with `request` attached to `target` (check (b))."""
        total = 0.0
        insts = node_instances(node, target) if target is not None else node.instances.values()
        for inst in insts:
            total += self.est.time_slice(inst, request if inst is target else None)
        return total

    def _start(self, node: Node, now: float) -> float:
        """Validation starts when the running grant is expected to end (grants run to the end)."""
        return max(now, node.grant_end_estimate) if node.grant_instance is not None else now

    def prefill_ok(self, target: Instance, request: Request, now: float) -> bool:
        node = target.node
        start = self._start(node, now)
        grace = cold_grace(target, now)
        release = start if grace is None else max(start, now + grace)
        deadline = request.deadline if grace is None else request.deadline_after(grace)
        if self.config.shadow == "full":
            return simulate_node(node, target, request, deadline, start, release, self.est,
                                 self.config.slo.tpot_slo, self.config.shadow_horizon)
        prefills = []
        for inst in node_instances(node, target):
            is_target = inst is target
            pending = inst.pending_prefill + ([request] if is_target else [])
            if not pending or not (is_target or inst.loaded):
                continue
            due = min(inst.min_deadline(), deadline) if is_target else inst.min_deadline()
            prefills.append((due, not is_target, self.est.prefill(inst, pending),
                             release if is_target else start))
        return edf_walk(prefills, start)


def edf_walk(prefills: list[tuple[float, bool, float, float]], start: float) -> bool:
    """Run (deadline, not_target, duration, release) prefills earliest deadline first among the
    released ones, without preemption, from `start`; False if the target or anything run after it
    finishes past its deadline. With every release at `start` this is the artifact's sorted walk."""
    waiting = sorted(prefills)
    t = start
    reached_target = False
    while waiting:
        ready = next((i for i, p in enumerate(waiting) if p[3] <= t), None)
        if ready is None:
            t = min(p[3] for p in waiting)
            continue
        deadline, not_target, duration, _ = waiting.pop(ready)
        t += duration
        reached_target = reached_target or not not_target
        if reached_target and t > deadline:
            return False
    return True
