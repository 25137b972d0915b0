"""The thread-count tuner: what it tries, what it keeps, how fast it follows a machine that changes,
and the model wrapper that applies it (same logits, the caller's thread count restored)."""
from __future__ import annotations

import time

import numba
import numpy as np
import pytest

from kernels.cpu import CpuKernels
from kernels.cpu_threads import ThreadTunedModel, step_kind
from kernels.thread_tuner import MAX_PROBE_INTERVAL, PROBE_INTERVAL, ThreadCountTuner, candidate_counts
from models.llama import LlamaModel, LlamaWeights
from models.random_weights import TINY, random_tensors
from refengine.bench.steps import decode_step, prefill_step, random_cache

KIND = ("decode", 1)


class Machine:
    """Step times per thread count that a test can change: the machine the tuner learns."""

    def __init__(self, times: dict[int, float]):
        self.times = dict(times)

    def run(self, tuner: ThreadCountTuner, steps: int, threads: int = 2) -> list[int]:
        used = []
        for _ in range(steps):
            n = tuner.choose(KIND, threads)
            tuner.record(KIND, threads, n, self.times[n])
            used.append(n)
        return used


def test_candidates_are_the_callers_count_then_halvings():
    assert candidate_counts(16) == (16, 8, 4, 2, 1)
    assert candidate_counts(6) == (6, 3, 1)
    assert candidate_counts(2) == (2, 1)
    assert candidate_counts(1) == (1,)


def test_the_first_step_of_a_kind_does_not_count_and_each_count_is_tried_once():
    """The first step of a kind may be a compile: 100 s must not make two threads look slow. Another
    count's first run compiles nothing, so it counts: one try of one thread decides."""
    tuner = ThreadCountTuner()
    first_step = {2: 100.0}
    used = []
    for _ in range(3):
        n = tuner.choose(KIND, 2)
        tuner.record(KIND, 2, n, first_step.pop(n, {2: 0.020, 1: 0.030}[n]))
        used.append(n)
    assert used == [2, 2, 1]
    assert Machine({2: 0.020, 1: 0.030}).run(tuner, 10) == [2] * 10
    assert Machine({2: 0.045, 1: 0.030}).run(ThreadCountTuner(), 10) == [2, 2] + [1] * 8


def test_a_slower_count_is_retried_ever_more_rarely():
    tuner = ThreadCountTuner()
    machine = Machine({2: 0.020, 1: 0.030})
    used = machine.run(tuner, 3 + 4000)[3:]     # after the first step and one try of each count
    tries = [i for i, n in enumerate(used) if n == 1]
    gaps = np.diff(tries)
    assert tries[0] == PROBE_INTERVAL
    assert list(gaps[:3]) == [2 * PROBE_INTERVAL + 1, 4 * PROBE_INTERVAL + 1, 8 * PROBE_INTERVAL + 1]
    assert gaps[-1] == MAX_PROBE_INTERVAL + 1
    assert len(tries) < 15          # of 4,000 steps: a quiet machine pays almost nothing


def test_a_busy_neighbour_moves_the_step_to_fewer_threads_and_back():
    """Quiet: two threads win. A neighbour takes a core: two threads now wait for each other, one
    wins, within a few steps. The neighbour leaves: a later retry finds two threads faster again."""
    tuner = ThreadCountTuner()
    machine = Machine({2: 0.020, 1: 0.030})
    machine.run(tuner, 200)
    machine.times = {2: 0.045, 1: 0.030}
    busy = machine.run(tuner, 200)
    assert busy[:2] == [2, 2] and busy[3:6] == [1, 1, 1]   # the median of the last three turns in 2 steps
    assert busy[3:].count(2) < 5
    machine.times = {2: 0.020, 1: 0.030}
    quiet = machine.run(tuner, 2 * MAX_PROBE_INTERVAL)
    back = quiet.index(2)
    assert back <= MAX_PROBE_INTERVAL + 1
    assert quiet[back:].count(1) < 10


def test_kinds_and_caller_counts_learn_apart():
    tuner = ThreadCountTuner()
    for _ in range(4):
        n = tuner.choose(("prefill", 8), 2)
        tuner.record(("prefill", 8), 2, n, {2: 0.01, 1: 0.02}[n])
    assert tuner.choose(("prefill", 8), 2) == 2
    assert tuner.choose(KIND, 2) == 2           # new kind: measured from the start
    assert tuner.choose(KIND, 1) == 1           # a caller on one thread gets one thread


def test_step_kinds():
    rng = np.random.default_rng(0)
    assert step_kind(decode_step(TINY, 3, 40, rng)) == (("decode", 2), 1)
    assert step_kind(decode_step(TINY, 1, 40, rng))[0] != step_kind(decode_step(TINY, 2, 40, rng))[0]
    assert step_kind(decode_step(TINY, 8, 40, rng))[0] == step_kind(decode_step(TINY, 15, 40, rng))[0]
    assert step_kind(prefill_step(TINY, 100, rng)) == (("prefill", 7), 100)
    assert step_kind(prefill_step(TINY, 127, rng))[0] == step_kind(prefill_step(TINY, 64, rng))[0]


@pytest.fixture(scope="module")
def tiny_model():
    kernels = CpuKernels(bf16=False)
    return LlamaModel(TINY, LlamaWeights.from_hf(random_tensors(TINY, seed=5), TINY, kernels), kernels)


def test_the_wrapper_gives_the_models_logits_and_restores_the_thread_count(tiny_model):
    wrapped = ThreadTunedModel(tiny_model)
    threads = numba.get_num_threads()
    seen = []
    forward = tiny_model.forward

    class Spy:
        config, kernels, weights = tiny_model.config, tiny_model.kernels, tiny_model.weights

        def forward(self, *args):
            seen.append(numba.get_num_threads())
            return forward(*args)

    wrapped.model = Spy()
    for step in (decode_step(TINY, 2, 30, np.random.default_rng(1)), prefill_step(TINY, 40, np.random.default_rng(2))):
        k_cache, v_cache = random_cache(tiny_model, int(step.block_tables.size))
        expected = tiny_model.forward(step, k_cache.copy(), v_cache.copy())
        for _ in range(4):
            np.testing.assert_array_equal(wrapped.forward(step, k_cache.copy(), v_cache.copy()), expected)
            assert numba.get_num_threads() == threads
    assert set(seen) == set(candidate_counts(threads))
    assert wrapped.config is TINY


def test_a_failing_step_still_restores_the_thread_count():
    class Failing:
        def forward(self, *args):
            raise ValueError("bad step")

    wrapped = ThreadTunedModel(Failing())
    threads = numba.get_num_threads()
    for _ in range(3):
        with pytest.raises(ValueError, match="bad step"):
            wrapped.forward(decode_step(TINY, 1, 10, np.random.default_rng(3)), None, None)
        assert numba.get_num_threads() == threads


@pytest.mark.skipif(numba.get_num_threads() < 2, reason="needs at least 2 Numba threads to choose from")
def test_a_model_on_a_shared_tuner_starts_from_what_it_learnt():
    """The live runtime keeps one tuner per device and weights: a new instance's model runs its first
    step on the count found fastest, with no warm-up; a model with a tuner of its own starts on
    every thread."""
    seen = []

    class BesideABusyProcess:           # one thread is the faster here
        def forward(self, *args):
            seen.append(numba.get_num_threads())
            time.sleep(0.001 if seen[-1] == 1 else 0.010)

    step = decode_step(TINY, 1, 10, np.random.default_rng(4))
    shared = ThreadCountTuner()
    earlier = ThreadTunedModel(BesideABusyProcess(), shared)
    for _ in range(6):
        earlier.forward(step, None, None)
    assert seen[-2:] == [1, 1]
    seen.clear()
    ThreadTunedModel(BesideABusyProcess(), shared).forward(step, None, None)
    ThreadTunedModel(BesideABusyProcess()).forward(step, None, None)
    assert seen == [1, numba.get_num_threads()]


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs a Numba pool of at least 2 threads")
@pytest.mark.parametrize("case", [("prefill", 5), ("prefill", 40), ("prefill", 300), ("decode", 1, 0),
                                  ("decode", 1, 200), ("decode", 3, 47), ("decode", 8, 100), ("decode", 20, 33)])
def test_every_thread_count_computes_the_same_logits(tiny_model, case):
    """Kernels divide their work by the pool's size, never by the count they run on, so the tuner
    cannot change a token: one region (decode of 1-5), op by op, BLAS prefill, at every count."""
    from kernels.cpu_decode_step import CpuDecodeModel
    rng = np.random.default_rng(len(case) * 100 + case[1])
    step = prefill_step(TINY, case[1], rng) if case[0] == "prefill" else decode_step(TINY, case[1], case[2], rng)
    k_cache, v_cache = random_cache(tiny_model, int(step.block_tables.size))
    model = CpuDecodeModel(tiny_model)
    threads = numba.get_num_threads()
    results = []
    try:
        for n in candidate_counts(threads):
            numba.set_num_threads(n)
            k, v = k_cache.copy(), v_cache.copy()
            results.append((model.forward(step, k, v), k, v))
    finally:
        numba.set_num_threads(threads)
    for logits, k, v in results[1:]:
        np.testing.assert_array_equal(logits, results[0][0])
        np.testing.assert_array_equal(k, results[0][1])
        np.testing.assert_array_equal(v, results[0][2])


def test_on_many_cores_the_tuner_walks_down_only_while_fewer_threads_win():
    """16 threads: 8 and 4 are faster (busy neighbours), 2 and 1 slower. The tuner settles on 4 and
    never runs a step on 1 thread, which was never 4's neighbour."""
    tuner = ThreadCountTuner()
    times = {16: 0.040, 8: 0.025, 4: 0.020, 2: 0.030, 1: 0.055}
    used = []
    for _ in range(600):
        n = tuner.choose(KIND, 16)
        tuner.record(KIND, 16, n, times[n])
        used.append(n)
    assert 1 not in used
    assert used[:6] == [16, 16, 8, 4, 2, 4]       # one try per count, down while it wins
    assert used[-100:].count(4) >= 97
