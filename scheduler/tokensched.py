"""Token-level scheduling on one node: one grant at a time, most urgent instance first (§4.2.3).

Each node holds a single execution permit. When it is free, the scheduler picks, among the node's
*eligible* instances, the one whose most urgent request has the smallest next-token deadline
(smallest headroom) and grants it one iteration — k iterations for a GPU decode, to amortise the
grant on fast steps. Prefill iterations run apart from decode iterations: an instance with waiting
prompts gets a one-iteration prefill grant first. When the grant ends the permit is free again and
the next pick happens at once, so a node never idles while an instance could run.

Eligible (§4.2.3, §8 item 4): has requests (or KV to rebuild for a migration); weights loaded and
not being unloaded; no memory action in flight or committed; KV in place for the next iteration;
within its static time share (only sllm+c+s has one: an instance may not compute more than
`time_share` of the wall time since it was created, the artifact's sleep rule, §6.2).

Invariant: at most one instance per node holds a grant (`Node.grant_instance`).
"""
from __future__ import annotations

from scheduler.actions import Grant
from scheduler.estimate import Estimator
from scheduler.state import Instance, Node


def kv_blocks_needed(inst: Instance) -> int:
    """KV blocks the engine may need for the next iteration (each sequence may open a block; a
    rebuild's earlier rounds hold theirs already, in `kv_used`)."""
    if not inst.pending and not inst.pending_rebuilds:
        return inst.kv_used + len(inst.requests)
    blocks_for = inst.model.blocks_for
    prefills = inst.pending_prefill
    return (inst.kv_used + inst.running
            + sum(blocks_for(r.context + 1) - blocks_for(r.copy_sent) for r in prefills))


def share_ready_at(inst: Instance) -> float:
    """Earliest time the instance is within its time share again (−inf without a share)."""
    if inst.time_share >= 1.0:
        return float("-inf")
    return inst.created + inst.busy_time / inst.time_share


class TokenScheduler:
    def __init__(self, estimator: Estimator):
        self.est = estimator
        self._next_grant = 1

    @staticmethod
    def eligible(inst: Instance, now: float) -> bool:
        return ((bool(inst.requests) or bool(inst.pending_rebuilds)) and not inst.computing
                and inst.loaded and not inst.memory_busy and inst.kv.physical > 0
                and inst.kv.physical >= kv_blocks_needed(inst)
                and share_ready_at(inst) <= now + 1e-12)

    def pick(self, node: Node, now: float) -> Instance | None:
        best, best_deadline = None, float("inf")
        for inst in node.instances.values():
            if self.eligible(inst, now):
                deadline = inst.min_deadline()
                if best is None or deadline < best_deadline:
                    best, best_deadline = inst, deadline
        return best

    def grant(self, node: Node, now: float) -> Grant | None:
        """Hand the node's permit to the most urgent eligible instance, if the permit is free."""
        if node.grant_instance is not None:
            return None
        inst = self.pick(node, now)
        if inst is None:
            return None
        rebuilds = inst.pending_rebuilds
        if inst.pending or rebuilds:
            kind, iterations = "prefill", 1
            duration = self.est.prefill(inst, inst.pending_prefill)
            inst.rebuilding = tuple(r.id for r in rebuilds)
            for r in rebuilds:                  # the executor sends each its latest tokens now
                r.copy_rounds, r.copy_sent = r.copy_rounds + 1, r.context
        else:
            step = self.est.decode(inst, inst.batch, inst.context_tokens)
            kind, iterations = "decode", self.est.decode_iterations(inst, step)
            duration = iterations * step
        inst.computing = True
        node.grant_instance = inst
        node.grant_end_estimate = now + duration
        grant = Grant(self._next_grant, node.id, inst.id, kind, iterations)
        self._next_grant += 1
        return grant

    @staticmethod
    def release(node: Node) -> None:
        if node.grant_instance is not None:
            node.grant_instance.computing = False
        node.grant_instance = None

    @staticmethod
    def share_wakeup(node: Node, now: float) -> float | None:
        """When a time-share-blocked instance with work becomes eligible, if any (for timers)."""
        times = [share_ready_at(i) for i in node.instances.values()
                 if i.requests and share_ready_at(i) > now]
        return min(times, default=None)
