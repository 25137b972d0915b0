"""The decode step as one parallel region (`kernels.cpu_decode_step`) against the op-by-op forward
it replaces, and the barrier its threads meet at (`kernels.cpu_sync`).

Both paths run the same helpers in the same order, so in a process where both were compiled, or
both loaded from Numba's cache, their logits and caches are bit-identical. Where one was compiled
here and the other loaded, they differ at the ulp level: a parallel kernel's cached code is not the
code this process compiled (`test_cpu_reproducible`). Through the layers that reached ~2e-6 and
failed an exact comparison of the V cache once. The tolerance below (1e-5) covers that and LLVM
vectorising an inlined loop differently on another CPU."""
from __future__ import annotations

import dataclasses
import time

import numba
import numpy as np
import pytest
from numba import prange

from kernels import cpu_decode_step
from kernels.cpu import CpuKernels
from kernels.cpu_decode_step import MAX_SEQUENCES, CpuDecodeModel
from kernels.cpu_sync import SYNC_WORDS, barrier, check_in, checked_in
from models.config import LlamaConfig
from models.llama import LlamaModel, LlamaWeights
from models.random_weights import TINY, random_tensors
from refengine.bench.steps import decode_step, prefill_step, random_cache
from tests.kernels.test_cpu_kernels import greedy_outputs

# GQA ratio 1 and head dim 64 beside TINY's ratio 3 and head dim 16
WIDE_HEADS = dataclasses.replace(TINY, num_attention_heads=2, num_key_value_heads=2, head_dim=64, hidden_size=96)
TOL = dict(rtol=1e-5, atol=1e-5)


def _model(config: LlamaConfig, kernels: CpuKernels | None = None) -> LlamaModel:
    kernels = kernels or CpuKernels(bf16=False)
    return LlamaModel(config, LlamaWeights.from_hf(random_tensors(config, seed=3), config, kernels), kernels)


def _both_paths(model: LlamaModel, step):
    """(logits, K cache, V cache) op by op and in one region, from the same random cache."""
    k_cache, v_cache = random_cache(model, int(step.block_tables.size))
    k_fast, v_fast = k_cache.copy(), v_cache.copy()
    slow = model.forward(step, k_cache, v_cache)
    fast = CpuDecodeModel(model).forward(step, k_fast, v_fast)
    return (slow, k_cache, v_cache), (fast, k_fast, v_fast)


@pytest.mark.parametrize("config", [TINY, WIDE_HEADS], ids=["gqa3-d16", "gqa1-d64"])
@pytest.mark.parametrize("batch", range(1, MAX_SEQUENCES + 1))
@pytest.mark.parametrize("context", [0, 15, 16, 17, 200])
def test_one_region_step_equals_op_by_op(config, batch, context):
    """Contexts on and across block boundaries (16 tokens a block), the new token the first of a
    block (16) and alone (0): logits and both caches as the op-by-op forward leaves them."""
    model = _model(config)
    slow, fast = _both_paths(model, decode_step(model.config, batch, context, np.random.default_rng(batch)))
    np.testing.assert_allclose(fast[0], slow[0], **TOL)
    np.testing.assert_allclose(fast[1], slow[1], **TOL)
    np.testing.assert_allclose(fast[2], slow[2], **TOL)


@pytest.mark.parametrize("batch", range(1, MAX_SEQUENCES + 1))
@pytest.mark.parametrize("context", [0, 17, 200])
def test_one_region_step_on_bf16_weights_equals_op_by_op(batch, context):
    """The bf16-weights backend: the region's GEMVs read the same bf16 tiles with the same
    micro-kernel, gate/up's SwiGLU per block of 16, so logits and caches are the op-by-op ones."""
    model = _model(TINY, CpuKernels(bf16=False, bf16_weights=True))
    slow, fast = _both_paths(model, decode_step(TINY, batch, context, np.random.default_rng(batch)))
    np.testing.assert_allclose(fast[0], slow[0], **TOL)
    np.testing.assert_allclose(fast[1], slow[1], **TOL)
    np.testing.assert_allclose(fast[2], slow[2], **TOL)


@pytest.mark.parametrize("bf16_weights", [False, True], ids=["float32", "bf16-weights"])
def test_greedy_tokens_through_an_instance_match(bf16_weights):
    """Six prompts joining a running batch: steps of 1-5 sequences run in one region, the prefills
    and the 6-sequence steps op by op, and every greedy token is the op-by-op forward's."""
    kernels = CpuKernels(bf16=False, bf16_weights=bf16_weights)
    assert greedy_outputs(kernels, CpuDecodeModel) == greedy_outputs(kernels)


class _Spy:
    """Counts the wrapped model's own forward calls."""

    def __init__(self, model: LlamaModel):
        self.model, self.calls = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, *args):
        self.calls += 1
        return self.model.forward(*args)


@pytest.mark.parametrize("case", ["prefill", "observed", "too many sequences", "bf16 weights not in 16s"])
def test_other_steps_go_op_by_op(case):
    """Prefills, observed steps, more than MAX_SEQUENCES sequences, and bf16 weights whose outputs
    are not whole blocks of 16 (the region's micro-kernel writes 16 at a time in place; the op-by-op
    GEMV pads) go to the wrapped model's forward."""
    config = dataclasses.replace(TINY, vocab_size=120) if case == "bf16 weights not in 16s" else TINY
    model = _Spy(_model(config, CpuKernels(bf16=False, bf16_weights=case == "bf16 weights not in 16s")))
    step = (prefill_step(config, 20, np.random.default_rng(0)) if case == "prefill"
            else decode_step(config, MAX_SEQUENCES + 1 if case == "too many sequences" else 2, 30,
                             np.random.default_rng(0)))
    k_cache, v_cache = random_cache(model.model, int(step.block_tables.size))
    observe = (lambda name, array: None) if case == "observed" else None
    CpuDecodeModel(model).forward(step, k_cache, v_cache, observe)
    assert model.calls == 1


def test_positions_past_the_angle_table_fall_back_then_run_in_the_region():
    """The first step past the table's 4,096 positions goes op by op, which grows the table; the
    next runs in the region. Both as the op-by-op forward computes them."""
    model = _Spy(_model(TINY))
    wrapped = CpuDecodeModel(model)
    for expected_calls in (1, 1):
        step = decode_step(TINY, 2, 5000, np.random.default_rng(expected_calls))
        k_cache, v_cache = random_cache(model.model, int(step.block_tables.size))
        k_slow, v_slow = k_cache.copy(), v_cache.copy()
        np.testing.assert_allclose(wrapped.forward(step, k_cache, v_cache),
                                   model.model.forward(step, k_slow, v_slow), **TOL)
        assert model.calls == expected_calls


def test_a_region_without_a_thread_per_part_does_nothing_and_says_so():
    """Two parts on one thread would wait for each other forever at the first barrier: the
    check-in closes instead (~20 ms), the program returns False and leaves the cache untouched."""
    model = _model(TINY)
    step = decode_step(TINY, 1, 30, np.random.default_rng(0))
    k_cache, v_cache = random_cache(model, int(step.block_tables.size))
    before = k_cache.copy()
    wrapped = CpuDecodeModel(model)
    cos, sin = model.kernels.rope_table.get(TINY.head_dim, TINY.rope_theta)
    program = cpu_decode_step._program(TINY.head_dim, TINY.num_attention_heads // TINY.num_key_value_heads, 16,
                                       TINY.num_key_value_heads)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        started = time.perf_counter()
        ran = program(step.token_ids, step.positions, step.slot_mapping, step.block_tables, step.context_lens,
                      *wrapped._resident_weights(), k_cache, v_cache, cos, sin, np.float32(TINY.rms_norm_eps),
                      np.float32(model.scale), TINY.intermediate_size, 1, np.empty((1, TINY.vocab_size), np.float32),
                      2, 2)
        waited = time.perf_counter() - started
    finally:
        numba.set_num_threads(threads)
    assert not ran
    assert waited < 5.0
    np.testing.assert_array_equal(k_cache, before)


@numba.njit(parallel=True)
def _count_in_step(sync, parts, rounds, counts, violations):
    """Each part counts; after each barrier every part must see every other part's count."""
    for part in prange(parts):
        if not check_in(sync, parts):
            continue
        for r in range(rounds):
            counts[part] += 1
            barrier(sync, parts)
            for other in range(parts):
                if counts[other] != r + 1:
                    violations[part] += 1
            barrier(sync, parts)
    return checked_in(sync, parts)


@pytest.mark.parametrize("parts", [1, 2])
def test_barrier_keeps_parts_in_step(parts):
    if parts > numba.get_num_threads():
        pytest.skip(f"needs {parts} Numba threads, this machine has {numba.get_num_threads()}")
    counts, violations = np.zeros(parts, np.int64), np.zeros(parts, np.int64)
    assert _count_in_step(np.zeros(SYNC_WORDS, np.int64), parts, 20_000, counts, violations)
    assert counts.tolist() == [20_000] * parts
    assert violations.tolist() == [0] * parts
