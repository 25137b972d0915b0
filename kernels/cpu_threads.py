"""How many of Numba's threads a CPU step should use, learnt from how long steps take.

Why: on a shared machine another process often holds a core. Then a step that splits its work
across every core waits at each barrier and join for the thread that is not running. On the 2-core
Zen 3 VM beside one busy process, one thread beat two on every kind of step (`bench contention`,
docs/BENCHMARKS.md, 2026-12-07): batch-1 decode 30.1 against 21.1 tok/s, batch 8 119 against 50,
prefill of 128 tokens 291 against 201. On the quiet machine two threads won by 1.5-1.6x. Load
averages and run-queue counts do not say which will win, so `ThreadCountTuner` measures it. With
it, the same run got 1.4-2.3x the two-thread figures beside the busy process and 0.95-1.02x of them
on the quiet machine.

Per kind of step (`step_kind`), each candidate count (the caller's count, then halvings down to 1)
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

Numba's `set_num_threads` applies to the calling thread only, so a device's worker thread can
change it per step without touching other threads. The one-region decode step runs one part per
thread (`cpu_decode_step`); every other parallel kernel, `cpu_pool`'s GEMMs too, spreads its work
items over that many threads.
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import numba

from kernels.interface import Array
from kernels.model_wrapper import ModelWrapper

PROBE_INTERVAL = 32        # steps of a kind between tries of a count that is not the fastest
MAX_PROBE_INTERVAL = 1024  # ...doubling after each try it loses, up to this
RECENT_TIMES = 3           # an estimate is the median of this many recent times
# What kernels divide their work by: the size of Numba's pool, not the count a step runs on, so that
# a step's arithmetic (its attention splits, its BLAS slices), and so every logit, is the same
# whichever count the tuner picks (tested)
POOL_THREADS = numba.config.NUMBA_NUM_THREADS


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


def step_kind(step: Any) -> tuple[Hashable, int]:
    """A step's kind and its units of work: a decode step by the power of two of its batch, timed
    per step (its time is mostly the weight stream, within ~1.3x across a bucket); a prefill by the
    power of two of its token count, timed per token. Buckets, not exact sizes, because a serving
    batch changes size every few steps, and each new kind starts by trying every count."""
    if step.is_prefill:
        tokens = len(step.token_ids)
        return ("prefill", tokens.bit_length()), tokens
    return ("decode", len(step.context_lens).bit_length()), 1


class ThreadTunedModel(ModelWrapper):
    """A CPU model whose every step runs on the thread count that `ThreadCountTuner` finds fastest
    for it now; everything else is the wrapped model's.

    `tuner` is what the model learns into, by default its own. Given one that earlier models of the
    same weights filled on the same thread, a new instance (a cold start after scale-to-zero) runs
    its first steps on the counts they found fastest, instead of trying every count again. On the
    quiet 2-core Zen 3 VM such a try runs one step of each kind on one thread: a prefill of 100
    tokens at ~1.7x its time (424-440 ms against 250), a batch-1 decode step at ~1.6x (34 ms against
    21; in-process, median of 5, 2026-12-07)."""

    def __init__(self, model: Any, tuner: ThreadCountTuner | None = None):
        super().__init__(model)
        self.tuner = tuner if tuner is not None else ThreadCountTuner()

    def forward(self, step: Any, k_cache: Array, v_cache: Array,
                observe: Callable[[str, Array], None] | None = None) -> Array:
        kind, units = step_kind(step)
        threads = numba.get_num_threads()
        used = self.tuner.choose(kind, threads)
        numba.set_num_threads(used)
        try:
            started = time.perf_counter()
            logits = self.model.forward(step, k_cache, v_cache, observe)
            self.tuner.record(kind, threads, used, (time.perf_counter() - started) / units)
        finally:
            numba.set_num_threads(threads)
        return logits
