"""Token-based live migration (ServerlessLLM §4, §5.1): when moving a running request beats dropping
and re-prefilling it, and when a migration hands over.

A migration costs the destination one prefill per round: the first sends the request's whole
context (prompt + produced), each later one the tokens the source produced while the previous round
ran, until the destination is within `migration_gap` tokens (or `migration_rounds` rounds ran);
then the source stops and the destination prefills the last gap and continues. The client's only
pause is that last prefill — the source streams throughout — where drop-and-re-prefill makes it
wait for a prefill of the whole context on the new instance. That figure leaves out the eviction,
the re-placement and a cold destination's start-up, all of which a migration hides too, so it is a
lower bound and a tie goes to migration.

The price is paid by whoever preempted: the source keeps its memory and decode time until the
hand-over, so a migration is chosen only if the preempting request still meets its first-token
deadline after waiting that long. (A destination that still has to load adds its start-up, which
the cost model does not know; its first round waits for it, the source streaming meanwhile.)

ServerlessLLM prices a migration as a·tokens + b from a profiled prefill; here the rounds are read
off the same profiled tables the scheduler predicts everything with (`costmodel.py` via
`estimate.py`), including the source's decode iteration, which sets how fast the gap refills.

Invariants: pure reading of state. Rounds converge only if the destination prefills a token faster
than the source decodes one; otherwise there is no plan and the request is re-prefilled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from scheduler.config import SchedulerConfig
from scheduler.estimate import Estimator
from scheduler.state import Instance, Migration, Request


@dataclass(frozen=True)
class MigrationPlan:
    rounds: int
    duration: float         # seconds of destination prefill before the hand-over (the source streams)
    pause: float            # the client's wait at the hand-over: the prefill of the last gap
    reprefill_pause: float  # the client's wait with drop-and-re-prefill: the whole context's prefill


def plan(request: Request, source: Instance, destination: Instance, est: Estimator,
         config: SchedulerConfig) -> MigrationPlan | None:
    """The rounds that would move `request` from `source` to `destination`, or None if the
    destination cannot catch up with the source."""
    period = est.decode(source, source.batch, source.context_tokens)   # s per token on the source
    gap, rounds, duration = request.context, 0, 0.0
    while True:
        seconds = est.prefill_tokens(destination, gap)
        produced = math.ceil(seconds / period) if period > 0 else 0
        duration, rounds = duration + seconds, rounds + 1
        if produced <= config.migration_gap or rounds >= config.migration_rounds:
            break
        if produced >= gap:
            return None
        gap = produced
    # the last prefill also feeds the token the destination held back (see `state.Migration`)
    return MigrationPlan(rounds, duration, est.prefill_tokens(destination, produced + 1),
                         est.prefill_tokens(destination, request.context))


def beats_reprefill(moving: MigrationPlan | None, preemptor: Request, target: Instance, now: float,
                    est: Estimator) -> bool:
    """Migrate rather than re-prefill: the client's pause is no longer, and `preemptor` still gets
    its first token on `target` in time though the victim keeps its share until the hand-over."""
    if moving is None or moving.pause > moving.reprefill_pause:
        return False
    return now + moving.duration + est.prefill(target, [preemptor]) <= preemptor.deadline


def hand_over_now(migration: Migration, config: SchedulerConfig) -> bool:
    """After a round: is the destination close enough to the source (or have enough rounds run)?"""
    gap = migration.request.context - migration.synced
    return gap <= config.migration_gap or migration.rounds >= config.migration_rounds
