"""Live migration instead of drop-and-re-prefill for a preemption victim (ServerlessLLM §4, §5.1).

SLINFER preempts by dropping the victim's requests and re-prefilling them wherever they are placed
again (§4.4.1): a request's stream stops until its prompt and generated tokens are prefilled
anew. ServerlessLLM moves it live instead: a warm instance of the same model rebuilds the KV from
the tokens while the source keeps decoding, and the stream pauses only at the hand-over, for the
few tokens produced meanwhile. The price is time: the victim's memory is freed only when its last
request has been handed over, so the request that preempted it waits.

Each option is costed as (deadline lateness, stall), compared in that order, estimated with the
profiled tables (ServerlessLLM's migration time `a·tokens + b` is a linear fit of exactly this
prefill). Lateness comes first because the SLOs are what SLINFER protects; the stall — how long a
running stream stops — decides between options that keep the same deadlines, which under
cumulative deadlines is the common case (a decoding request has usually banked enough slack to
absorb a re-prefill):
- drop: the stream stops for a re-prefill at the earliest (a lower bound: the request still has
  to be placed again): stall = rebuild, late by max(0, now + rebuild − deadline);
- migrate: the stream continues at the source during the rebuild, then stops for the catch-up
  prefill of the `gap` tokens produced meanwhile: stall = catch-up, late by max(0, now + rebuild
  + catch-up − (deadline + gap · TPOT)); plus the extra lateness of the preempting request, whose
  first token now waits for the slowest destination node to finish its rebuilds (a new request's
  wait within its TTFT SLO is no stall: it has not started streaming).
A request migrates if that costs strictly less; on a tie drop-and-re-prefill, which frees the
memory at once, wins.

Invariants: only prefilled requests of a GPU victim migrate (a CPU victim is preempted for its
compute, which it would keep using while draining), each to a warm (loaded, not draining)
instance of its model that admits it by shadow validation (its rebuild competing with the node's
prefills at that instance's own urgency), tried in bin-packing order; planning only reads state,
`Lifecycle.preempt` starts each migration chosen before choosing the next.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from scheduler.admission import ShadowValidator
from scheduler.config import SchedulerConfig
from scheduler.consolidation import order_instances
from scheduler.estimate import Estimator
from scheduler.state import Instance, Request

Chooser = Callable[[Request], "Instance | None"]


@dataclass(frozen=True)
class MoveCost:
    """Estimated seconds of one request's move from `source` to a destination."""

    rebuild: float          # the destination's prefill of prompt + generated tokens
    gap: int                # tokens the source produces meanwhile
    catch_up: float         # the destination's prefill of those: the pause the client sees

    @staticmethod
    def lateness(finish: float, deadline: float) -> float:
        return max(0.0, finish - deadline)

    def drop(self, request: Request, now: float) -> tuple[float, float]:
        """(lateness, stall) of dropping the request and re-prefilling it."""
        return self.lateness(now + self.rebuild, request.deadline), self.rebuild

    def migrate(self, request: Request, now: float, tpot: float) -> tuple[float, float]:
        """(lateness, stall) of moving it live, the preempting request aside."""
        late = self.lateness(now + self.rebuild + self.catch_up,
                             request.deadline + self.gap * tpot)
        return late, self.catch_up


def move_cost(request: Request, source: Instance, destination: Instance,
              est: Estimator) -> MoveCost:
    rebuild = est.prefill(destination, [request])
    step = est.decode(source, source.batch, source.context_tokens)
    gap = math.ceil(rebuild / step) if step > 0 else 0
    return MoveCost(rebuild, gap, est.prefill_tokens(destination, gap) if gap else 0.0)


class Migrator:
    def __init__(self, config: SchedulerConfig, validator: ShadowValidator):
        self.config = config
        self.validator = validator
        self.est = validator.est

    def chooser(self, victim: Instance, target: Instance, request: Request,
                serving: Sequence[Instance], now: float) -> Chooser | None:
        """For `Lifecycle.preempt`: per request of `victim`, the instance to migrate it to, or
        None to drop and re-prefill it; `request` joins `target` once the victim is gone."""
        if not self.config.migration or victim.node.kind != "gpu":
            return None
        tpot = self.config.slo.tpot_slo
        first_token = self.est.prefill(target, [request])
        waits: dict[str, float] = {}

        def preemptor_lateness(wait: float) -> float:
            return MoveCost.lateness(now + wait + first_token, request.deadline)

        def choose(r: Request) -> Instance | None:
            if not r.prefilled:
                return None
            dest = self._destination(r, victim, serving, now)
            if dest is None:
                return None
            cost = move_cost(r, victim, dest, self.est)
            before = max(waits.values(), default=0.0)
            node_wait = waits.get(dest.node.id, 0.0) + cost.rebuild
            extra = preemptor_lateness(max(before, node_wait)) - preemptor_lateness(before)
            late, stall = cost.migrate(r, now, tpot)
            if (late + extra, stall) >= cost.drop(r, now):
                return None
            waits[dest.node.id] = node_wait
            return dest

        return choose

    def _destination(self, r: Request, victim: Instance, serving: Sequence[Instance],
                     now: float) -> Instance | None:
        """The first warm instance in bin-packing order that admits `r`'s rebuild, whose first
        token is not due (the source keeps the stream), so it waits at that instance's urgency."""
        rebuild = replace(r, ttft_slo=math.inf, instance=None, prefilled=False)
        candidates = [i for i in serving
                      if i is not victim and i.loaded and not i.draining and not i.retired]
        for dest in order_instances(candidates, self.config.instance_order):
            if self.validator.admit(dest, rebuild, now):
                return dest
        return None
