"""Which thread count to run a kind of step on, learnt from the times steps took: pure logic, no
clock and no Numba, so the live runtime keeps one per device and weights whatever the backend, and
tests drive it on a fake machine. Why a CPU step needs it: `kernels/cpu_threads.py`.

Per kind of step (`cpu_threads.step_kind`), each candidate count (the caller's count, then halvings down to 1)
keeps its last few times. The step runs on the count with the lowest median. Its neighbours in that
list (twice and half as many threads) are measured from time to time, because the machine changes:
first right away, then after `PROBE_INTERVAL` steps of that kind, and a neighbour that loses again
waits twice as long before its next try (up to `MAX_PROBE_INTERVAL` steps). When a neighbour takes
over as fastest, every interval starts again, and its own other neighbour is tried next. So the
tuner walks down from all the threads only as far as fewer keep winning: on 16 cores with one busy
neighbour it need not ever run a step on one thread. The first step of each kind is not counted:
it may include a compile or a cold model's wait for its weights. A count's first run after that
is: changing the count compiles nothing (the kernels take it as an argument, and Numba's pool
started every thread at its first parallel call), so each count costs one try, not two.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable

PROBE_INTERVAL = 32        # steps of a kind between tries of a count that is not the fastest
MAX_PROBE_INTERVAL = 1024  # ...doubling after each try it loses, up to this
RECENT_TIMES = 3           # an estimate is the median of this many recent times


def candidate_counts(threads: int) -> tuple[int, ...]:
    """`threads`, then halvings down to 1: (16, 8, 4, 2, 1); (2, 1); (1,)."""
    counts = [threads]
    while counts[-1] > 1:
        counts.append(counts[-1] // 2)
    return tuple(counts)


@dataclass
class _Count:
    """What is known of one thread count for one kind of step."""
    times: deque = field(default_factory=lambda: deque(maxlen=RECENT_TIMES))   # seconds per unit of work
    interval: int = PROBE_INTERVAL
    next_try: int = 0      # the step of this kind from which it is tried again

    @property
    def estimate(self) -> float:
        return statistics.median(self.times) if self.times else float("inf")


@dataclass
class _Kind:
    counts: dict[int, _Count]
    warmed_up: bool = False       # its first step ran (and was not counted)
    steps: int = 0
    trying: int | None = None     # the count being tried again in this kind's current step

    @property
    def fastest(self) -> int:
        return min(self.counts, key=lambda n: self.counts[n].estimate)


class ThreadCountTuner:
    """Picks the thread count per kind of step and learns from the times it is told.

    Pure logic, no clock: `choose` then `record` the step's seconds per unit of work. Not thread-safe:
    models may share one only where one thread steps them all (the live runtime keeps one per device
    and weights)."""

    def __init__(self) -> None:
        self._kinds: dict[Hashable, _Kind] = {}

    def choose(self, kind: Hashable, threads: int) -> int:
        """The count to run the next step of `kind` on, out of `candidate_counts(threads)`."""
        state = self._kinds.get((kind, threads))
        if state is None:
            state = self._kinds[(kind, threads)] = _Kind({n: _Count() for n in candidate_counts(threads)})
        state.trying = None
        counts = list(state.counts)                      # largest first
        if not state.counts[counts[0]].times:
            return counts[0]
        best = counts.index(state.fastest)
        for neighbour in counts[max(best - 1, 0):best] + counts[best + 1:best + 2]:
            if state.steps >= state.counts[neighbour].next_try:
                state.trying = neighbour
                return neighbour
        return counts[best]

    def record(self, kind: Hashable, threads: int, used: int, seconds_per_unit: float) -> None:
        """The step of `kind` chosen out of `threads` ran on `used` threads and took this long."""
        state = self._kinds[(kind, threads)]
        state.steps += 1
        count = state.counts[used]
        if not state.warmed_up:
            state.warmed_up = True
            return
        if state.trying == used:
            previous_best, first_time = state.fastest, not count.times
            count.times.clear()            # what it measured before is stale
            count.times.append(seconds_per_unit)
            if state.fastest == used != previous_best:
                for other in state.counts.values():
                    if other.times:        # a count never measured stays due at once
                        other.interval, other.next_try = PROBE_INTERVAL, state.steps + PROBE_INTERVAL
            else:
                if not first_time:
                    count.interval = min(2 * count.interval, MAX_PROBE_INTERVAL)
                count.next_try = state.steps + count.interval
            return
        count.times.append(seconds_per_unit)
        if not count.next_try:
            count.next_try = state.steps + count.interval
