"""Live migration instead of drop-and-re-prefill for a preemption victim (ServerlessLLM §4, §5.1).

SLINFER preempts by dropping the victim's requests and re-prefilling them wherever they are placed
again (§4.4.1): a request's stream stops until its prompt and generated tokens are prefilled
anew. ServerlessLLM moves it live instead: another instance of the same model rebuilds the KV
from the tokens while the source keeps decoding, and the stream pauses only at the hand-over, for
the few tokens produced meanwhile. The price is time: the victim's memory and compute are freed
only when its last request has been handed over, so the request that preempted it waits.

Each option is costed as (deadline lateness, stall), compared in that order, estimated with the
profiled tables (ServerlessLLM's migration time `a·tokens + b` is a linear fit of exactly this
prefill). Lateness comes first because the SLOs are what SLINFER protects; the stall — how long a
running stream stops — decides between options that keep the same deadlines, which under
cumulative deadlines is the common case (a decoding request has usually banked enough slack to
absorb a re-prefill):
- drop: the stream stops for a re-prefill at the earliest (a lower bound: the request still has
  to be placed again): stall = rebuild, late by max(0, now + rebuild − deadline);
- migrate: the stream continues at the source while the destination starts up (if it is still
  loading: its estimated start-up, `startup.py`; 0 when unknown) and rebuilds, then stops for the
  catch-up prefill of the `gap` tokens produced meanwhile, which also makes the next token (the
  live engine samples it from that pass): stall = catch-up, late by max(0, now +
  start-up + rebuild + catch-up − (deadline + gap · TPOT)); plus the extra lateness of the
  preempting request, whose first token now waits for the slowest destination node to finish its
  start-ups and rebuilds (a new request's wait within its TTFT SLO is no stall: it has not started
  streaming). On a GPU it waits for the victim's memory; on a CPU the victim's decode time is
  what it waits for, the node being over its budget until the victim has drained.
A request migrates if that costs strictly less; on a tie drop-and-re-prefill, which frees the
victim at once, wins.

Destinations: the model's warm instances (loaded, not draining) that admit the rebuild by shadow
validation (its rebuild competing with the node's prefills at that instance's own urgency), in
bin-packing order. With `config.migration_cold_destinations`, instances still loading count too,
and failing all of them a new instance on another node, as placement would start one
(ServerlessLLM loads the destination first, §4.2 step 1): a destination still loading costs its
start-up, which the source streams through.

Invariants: only prefilled requests migrate, of GPU victims (of CPU ones too with
`config.migration_compute_victims`); planning only reads state (a new destination is provisional
until `Lifecycle.preempt` starts the migration), and each migration chosen is started before the
next is chosen.
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
Elsewhere = Callable[[Request, Instance, float], "Instance | None"]   # a new instance off a node


@dataclass(frozen=True)
class MoveCost:
    """Estimated seconds of one request's move from `source` to a destination."""

    rebuild: float          # the destination's prefill of prompt + generated tokens
    gap: int                # tokens the source produces during start-up and rebuild
    catch_up: float         # the destination's prefill of those: the pause the client sees
    start_up: float = 0.0   # until the destination's weights are in, if it is still loading

    @property
    def ready(self) -> float:
        """Seconds until the destination holds the rebuilt KV."""
        return self.start_up + self.rebuild

    @staticmethod
    def lateness(finish: float, deadline: float) -> float:
        return max(0.0, finish - deadline)

    def drop(self, request: Request, now: float) -> tuple[float, float]:
        """(lateness, stall) of dropping the request and re-prefilling it."""
        return self.lateness(now + self.rebuild, request.deadline), self.rebuild

    def migrate(self, request: Request, now: float, tpot: float) -> tuple[float, float]:
        """(lateness, stall) of moving it live, the preempting request aside."""
        late = self.lateness(now + self.ready + self.catch_up,
                             request.deadline + self.gap * tpot)
        return late, self.catch_up


def caught_up(request: Request, config: SchedulerConfig) -> bool:
    """After a rebuild round: hand over, or rebuild the tokens the source made meanwhile in another
    round (ServerlessLLM's multi-round migration) while more than `migration_gap` are missing and
    fewer than `migration_rounds` rounds ran? The last catch-up is the client's pause."""
    gap = request.context - request.copy_sent
    return gap <= config.migration_gap or request.copy_rounds >= config.migration_rounds


def move_cost(request: Request, source: Instance, destination: Instance, est: Estimator,
              now: float = 0.0) -> MoveCost:
    rebuild = est.prefill(destination, [request])
    start_up = 0.0
    if not destination.loaded and destination.ready_at is not None:
        start_up = max(0.0, destination.ready_at - now)
    step = est.decode(source, source.batch, source.context_tokens)
    gap = math.ceil((start_up + rebuild) / step) if step > 0 else 0
    return MoveCost(rebuild, gap, est.prefill_tokens(destination, gap) if gap else 0.0, start_up)


class Migrator:
    def __init__(self, config: SchedulerConfig, validator: ShadowValidator,
                 elsewhere: Elsewhere | None = None):
        """`elsewhere(request, victim, now)`: a provisional new instance for `request` off the
        victim's node, or None (placement's own choice of a node)."""
        self.config = config
        self.validator = validator
        self.est = validator.est
        self.elsewhere = elsewhere

    def chooser(self, victim: Instance, target: Instance, request: Request,
                serving: Sequence[Instance], now: float) -> Chooser | None:
        """For `Lifecycle.preempt`: per request of `victim`, the instance to migrate it to, or
        None to drop and re-prefill it; `request` joins `target` once the victim is gone."""
        config = self.config
        compute = victim.node.kind != "gpu"
        if not config.migration or (compute and not config.migration_compute_victims):
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
            cost = move_cost(r, victim, dest, self.est, now)
            before = max(waits.values(), default=0.0)
            node_wait = max(waits.get(dest.node.id, 0.0), cost.start_up) + cost.rebuild
            extra = preemptor_lateness(max(before, node_wait)) - preemptor_lateness(before)
            late, stall = cost.migrate(r, now, tpot)
            if (late + extra, stall) >= cost.drop(r, now):
                return None
            waits[dest.node.id] = node_wait
            return dest

        return choose

    def _destination(self, r: Request, victim: Instance, serving: Sequence[Instance],
                     now: float) -> Instance | None:
        """The first instance in bin-packing order that admits `r`'s rebuild, whose first token is
        not due (the source keeps the stream), so it waits at that instance's urgency; with cold
        destinations, else a new one off the victim's node."""
        rebuild = replace(r, ttft_slo=math.inf, instance=None, prefilled=False)
        cold = self.config.migration_cold_destinations
        candidates = [i for i in serving if i is not victim and (i.loaded or cold)
                      and not i.draining and not i.retired]
        for dest in order_instances(candidates, self.config.instance_order):
            if self.validator.admit(dest, rebuild, now):
                return dest
        return self.elsewhere(rebuild, victim, now) if cold and self.elsewhere is not None else None
