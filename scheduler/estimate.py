"""Latency estimates the policy plans with: the cost model times a safety margin (§4.2.2).

The margin over-estimates every iteration (paper: 10 %; artifact: ×1.05 GPU, ×1.1 CPU) so that
shadow validation errs towards refusing. A prefill is estimated from the request's *total* length
(prompt + tokens already generated), which is what a re-prefill after eviction costs.

Slowdown (not in the paper): the tables are profiled once, and a shared machine can run slower
than that for minutes (the AMD VM of docs/BENCHMARKS.md ran at half speed in phases). Each node
keeps a moving average of how far its decode steps overran their margined estimate (never below
1, so it decays back once the node is fast again), and every estimate on the node is scaled by it:
admission then refuses what the node can no longer carry instead of letting a crowded device miss
every TPOT together. In the simulator steps take exactly the profiled time, so the factor stays 1.
"""
from __future__ import annotations

from typing import Iterable

from scheduler.config import SchedulerConfig
from scheduler.state import Instance, Request


SLOWDOWN_WEIGHT = 0.2   # of the newest decode step in a node's moving average
SLOWDOWN_CAP = 4.0      # one step's overrun counts at most this much


class Estimator:
    def __init__(self, config: SchedulerConfig):
        self._margin = dict(config.estimate_margin)
        self._tpot = config.slo.tpot_slo
        self._grant_target = config.grant_target
        self._slowdown: dict[str, float] = {}

    def slowdown(self, node_id: str) -> float:
        return self._slowdown.get(node_id, 1.0)

    def _scale(self, instance: Instance) -> float:
        return self._margin[instance.node.kind] * self.slowdown(instance.node.id)

    def observe_decode(self, instance: Instance, batch: int, context_tokens: int,
                       elapsed: float) -> None:
        """One decode step of `batch` sequences holding `context_tokens` in all took `elapsed` s."""
        estimate = self.decode(instance, batch, context_tokens) / self.slowdown(instance.node.id)
        if estimate <= 0 or elapsed <= 0:
            return
        overrun = min(max(elapsed / estimate, 1.0), SLOWDOWN_CAP)
        node = instance.node.id
        self._slowdown[node] = ((1 - SLOWDOWN_WEIGHT) * self.slowdown(node)
                                + SLOWDOWN_WEIGHT * overrun)

    def prefill(self, instance: Instance, requests: Iterable[Request]) -> float:
        """Σ over requests of one prefill each (the artifact's conservative sum, §4.2.4)."""
        return sum(instance.table.prefill(r.context) for r in requests) * self._scale(instance)

    def decode(self, instance: Instance, batch: int, context_tokens: int) -> float:
        if batch == 0:
            return 0.0
        return instance.table.decode(batch, context_tokens / batch) * self._scale(instance)

    def prefill_tokens(self, instance: Instance, tokens: int) -> float:
        """One prefill of `tokens` tokens (a migration's catch-up of the tokens it missed)."""
        return instance.table.prefill(tokens) * self._scale(instance)

    def time_slice(self, instance: Instance, extra: Request | None = None) -> float:
        """Share of TPOT_SLO one decode iteration of the instance takes (§4.2.4 check b). The
        tightest TPOT among its requests counts: a request with its own, stricter TPOT needs the
        instance stepped that much more often. Requests migrating in count as handed over."""
        batch, tokens = instance.batch, instance.context_tokens
        tpots = [r.tpot_slo for r in instance.requests.values()]
        if instance.copies:
            batch += len(instance.copies)
            tokens += sum(r.context for r in instance.copies.values())
            tpots += [r.tpot_slo for r in instance.copies.values()]
        if extra is not None:
            batch, tokens = batch + 1, tokens + extra.context
            tpots.append(extra.tpot_slo)
        return self.decode(instance, batch, tokens) / min(tpots, default=self._tpot)

    def decode_iterations(self, instance: Instance, step: float) -> int:
        """k iterations per GPU decode grant ≈ grant_target / iteration time `step` (§9 row 5)."""
        if instance.node.kind != "gpu" or step <= 0:
            return 1
        return max(1, int(self._grant_target / step))
