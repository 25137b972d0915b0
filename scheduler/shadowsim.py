"""Full shadow validation: simulate the node's next `horizon` seconds (SLINFER §4.2.4, Fig. 15).

The paper validates by simulating the node's future schedule with the candidate request attached;
the artifact only walks pending prefills (`admission.py`). This option (§9 row 3) replays the
token-level scheduler itself — each turn the instance with the earliest next-token deadline runs
one estimated iteration, prefill before decode — once with R and once without. R is refused if its
first token is late, or if an instance misses a deadline with R that it meets without R (misses
present in both runs are pre-existing and ignored). A cold target joins only at its `release`
(its estimated end of loading, `startup.py`), R's first token being due at `request_deadline`.

Invariants: pure function of the scheduler state, which it never changes; instance granularity (all
requests of a decode batch advance together, so the batch's earliest deadline stands for all).
"""
from __future__ import annotations

from dataclasses import dataclass

from scheduler.state import Instance, Node, Request


@dataclass
class _Lane:
    instance: Instance
    pending_deadline: float
    pending_cost: float
    pending_count: int
    pending_tokens: int
    running_deadline: float
    batch: int
    context: int
    release: float

    @property
    def next_deadline(self) -> float:
        return self.pending_deadline if self.pending_count else self.running_deadline


def _lanes(node: Node, target: Instance, request: Request | None, request_deadline: float,
           release: float, est) -> list[_Lane]:
    lanes = []
    insts = list(node.instances.values())
    if target.id not in node.instances:
        insts.append(target)
    inf = float("inf")
    for inst in insts:
        extra = [request] if (inst is target and request is not None) else []
        if not (inst.loaded or inst is target):
            continue
        pending = inst.pending_prefill + extra
        running = [r for r in inst.requests.values() if r.prefilled]
        if not pending and not running:
            continue
        deadlines = [r.deadline for r in inst.pending_prefill] + [request_deadline] * len(extra)
        lanes.append(_Lane(
            inst,
            min(deadlines, default=inf), est.prefill(inst, pending),
            len(pending), sum(r.context for r in pending),
            min((r.deadline for r in running), default=inf), len(running),
            sum(r.context for r in running), release if inst is target else -inf))
    return lanes


def _late(node: Node, target: Instance, request: Request | None, request_deadline: float,
          start: float, release: float, est, tpot: float,
          horizon: float) -> tuple[set[str], bool]:
    """Instances that miss a deadline within the horizon, and whether `request` itself is late."""
    lanes = _lanes(node, target, request, request_deadline, release, est)
    late: set[str] = set()
    request_late = False
    t, end = start, start + horizon
    while t < end and lanes:
        released = [x for x in lanes if x.release <= t]
        if not released:
            t = min(x.release for x in lanes)
            continue
        lane = min(released, key=lambda x: x.next_deadline)
        if lane.pending_count:
            t += lane.pending_cost
            if t > lane.pending_deadline:
                late.add(lane.instance.id)
            if request is not None and lane.instance is target and t > request_deadline:
                request_late = True
            lane.running_deadline = min(lane.running_deadline, lane.pending_deadline + tpot)
            lane.batch += lane.pending_count
            lane.context += lane.pending_tokens + lane.pending_count
            lane.pending_count, lane.pending_deadline = 0, float("inf")
        else:
            t += est.decode(lane.instance, lane.batch, lane.context)
            if t > lane.running_deadline:
                late.add(lane.instance.id)
            lane.running_deadline += tpot
            lane.context += lane.batch
    return late, request_late


def simulate_node(node: Node, target: Instance, request: Request, request_deadline: float,
                  start: float, release: float, est, tpot: float, horizon: float) -> bool:
    """True if attaching `request` to `target` breaks no deadline that was not broken anyway."""
    with_r, request_late = _late(node, target, request, request_deadline, start, release, est,
                                 tpot, horizon)
    if request_late:
        return False
    without_r, _ = _late(node, target, None, request_deadline, start, release, est, tpot,
                         horizon)
    return with_r <= without_r
