"""How many of Numba's threads a CPU step should use, learnt from how long steps take.

Why: on a shared machine another process often holds a core. Then a step that splits its work
across every core waits at each barrier and join for the thread that is not running. On the 2-core
Zen 3 VM beside one busy process, one thread beat two on every kind of step (`bench contention`,
docs/BENCHMARKS.md, 2026-12-07): batch-1 decode 32.2 against 22.2 tok/s, batch 8 117 against 45,
prefill of 128 tokens 327 against 206. On the quiet machine two threads won by 1.6-1.8x. Load
averages and run-queue counts do not say which will win, so `ThreadCountTuner` measures it. With
it, the same run got 1.45-2.5x the two-thread figures beside the busy process and 0.93-1.05x of them
on the quiet machine.

`ThreadCountTuner` (`kernels/thread_tuner.py`, pure logic) picks the count per kind of step
(`step_kind`); `ThreadTunedModel` runs each step on it.

Numba's `set_num_threads` applies to the calling thread only, so a device's worker thread can
change it per step without touching other threads. The one-region decode step runs one part per
thread (`cpu_decode_step`); every other parallel kernel, `cpu_pool`'s GEMMs too, spreads its work
items over that many threads.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Hashable

import numba

from kernels.interface import Array
from kernels.model_wrapper import ModelWrapper
from kernels.thread_tuner import ThreadCountTuner

# What kernels divide their work by: the size of Numba's pool, not the count a step runs on, so that
# a step's arithmetic (its attention splits, its BLAS slices), and so every logit, is the same
# whichever count the tuner picks (tested)
POOL_THREADS = numba.config.NUMBA_NUM_THREADS


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
