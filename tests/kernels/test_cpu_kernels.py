"""The Numba CPU kernels against the numpy reference, op by op, on random inputs; then a whole tiny
model through `Instance`, and the GIL.

Tolerances: both sides compute in float32 and differ only in summation order and in the libm behind
exp/sqrt, so elementwise ops and norms agree to rtol 1e-5 / atol 1e-6 (values ~N(0, 1)), GEMMs over
576 inputs (outputs ~24 in size) to atol 1e-4, the KV write exactly, and attention (a softmax-
weighted sum over up to 2048 keys) to rtol 1e-4 / atol 2e-5.
"""
from __future__ import annotations

import os
import platform
import resource
import threading
import time

import numba
import numpy as np
import pytest
from numba.core.codegen import get_host_cpu_features
from numba.core.registry import CPUDispatcher

from kernels import (amx_tiles, avx512_bf16, bf16, bf16_gemm, bf16_gemv, bf16_layout, cpu, cpu_attention, cpu_decode_attention,
                     cpu_decode_step, cpu_math, cpu_memory, cpu_pool, cpu_target, few_token_gemm, get_kernels)
from kernels import reference as ref
from kernels.cpu import CpuKernels
from kernels.few_token_gemm import SKINNY_MAX_TOKENS, few_token_matmul
from kernels.cpu_decode_step import CpuDecodeModel
from kernels.cpu_math import coarse_exp2, fast_exp, row_max
from models.llama import LlamaModel, LlamaWeights
from models.random_weights import TINY, random_tensors
from refengine.bench.steps import decode_step, random_cache
from refengine.engine.instance import Instance
from refengine.engine.sequence import SamplingParams
from tests.conftest import random_prompt, run_to_end
from tests.kernels.test_reference import paged

CPU = CpuKernels(bf16=False)
RNG = np.random.default_rng(2024)
ATTN_TOL = dict(rtol=1e-4, atol=2e-5)
HEAD_SHAPES = [(4, 4, 64), (9, 3, 64), (8, 2, 128)]   # (H, Hkv, D): GQA ratios 1, 3, 4


def randn(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * RNG.standard_normal(shape)).astype(np.float32)


# ---------------------------------------------------------------- elementwise ops
@pytest.mark.parametrize("tokens", [1, 17, 300, 2048])
def test_norms_match_reference(tokens):
    x, delta, weight = randn(tokens, 576), randn(tokens, 576, scale=3.0), 1 + randn(576, scale=0.1)
    np.testing.assert_allclose(CPU.rms_norm(x, weight, 1e-5), ref.rms_norm(x, weight, 1e-5), rtol=1e-5, atol=1e-6)
    summed, normed = CPU.add_rms_norm(x, delta, weight, 1e-5)
    expected_summed, expected_normed = ref.add_rms_norm(x, delta, weight, 1e-5)
    np.testing.assert_array_equal(summed, expected_summed)
    np.testing.assert_allclose(normed, expected_normed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads,kv_heads,head_dim", HEAD_SHAPES)
def test_rope_matches_reference_on_strided_views(heads, kv_heads, head_dim):
    """q and k arrive as column slices of the fused qkv output; positions past the first angle table
    (4096 rows) make it grow."""
    tokens = 37
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim)
    q = qkv[:, :heads * head_dim].reshape(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim)
    positions = np.concatenate([np.arange(20), RNG.integers(0, 9000, tokens - 20)]).astype(np.int64)
    for x in (q, k):
        np.testing.assert_allclose(CPU.rope(x, positions, 100000.0), ref.rope(x, positions, 100000.0),
                                   rtol=1e-5, atol=1e-6)


@numba.njit
def _apply(fn, x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = fn(x[i])
    return out


def test_exp_helpers_meet_their_stated_accuracy():
    """fast_exp: relative error below 5e-7 on [-87, 88]; coarse_exp2 (bf16 softmax): below 3e-6 on
    [-126, 127]. Random points, plus the integers, where the polynomials meet their range ends."""
    x = np.concatenate([RNG.uniform(-87, 88, 200_000), np.arange(-87, 89)]).astype(np.float32)
    np.testing.assert_array_less(np.abs(_apply(fast_exp, x) / np.exp(x.astype(np.float64)) - 1), 5e-7)
    x2 = np.concatenate([RNG.uniform(-126, 127, 200_000), np.arange(-126, 128)]).astype(np.float32)
    np.testing.assert_array_less(np.abs(_apply(coarse_exp2, x2) / np.exp2(x2.astype(np.float64)) - 1), 3e-6)
    assert _apply(coarse_exp2, np.array([-500.0], np.float32))[0] == np.float32(2.0 ** -126)


@numba.njit
def _row_max(row, count):
    return row_max(row, count)


@pytest.mark.parametrize("width", [1, 7, 16, 37, 256, 1025])
def test_row_max_is_exact(width):
    """The integer-ordered max equals numpy's: mixed signs, all negative, infinities, several
    counts; of signed zeros it picks +0 (numpy returns whichever zero comes first)."""
    rows = [RNG.standard_normal(width).astype(np.float32) * 50, -np.abs(RNG.standard_normal(width)).astype(np.float32)]
    zeros = np.full(width, -0.0, np.float32)
    zeros[-1] = 0.0
    infinite = RNG.standard_normal(width).astype(np.float32)
    infinite[0], infinite[-1] = -np.inf, np.inf
    for row in rows + [zeros, infinite]:
        for count in {1, width // 2 + 1, width}:
            assert _row_max(row, count) == row[:count].max(), row[:count]
    assert not np.signbit(_row_max(zeros, width))
    assert width == 1 or np.signbit(_row_max(zeros, width - 1))


@pytest.mark.parametrize("tokens", [1, 300])
def test_silu_mul_matches_reference(tokens):
    gate_up = randn(tokens, 2 * 1536, scale=4.0)   # wide enough that exp(-gate) overflows for some
    np.testing.assert_allclose(CPU.silu_mul(gate_up), ref.silu_mul(gate_up), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 2, 3, 5, SKINNY_MAX_TOKENS, 64, 300])
@pytest.mark.parametrize("width", [160, 161, 163])
def test_mlp_matches_reference(tokens, width):
    """The few-token kernels apply SiLU to their accumulators (F off a multiple of 4 leaves a work
    item part full)."""
    x, gate_up, down = randn(tokens, 96), randn(2 * width, 96, scale=0.3), randn(96, width, scale=0.3)
    np.testing.assert_allclose(CPU.mlp(x, gate_up, down), ref.mlp(x, gate_up, down), rtol=1e-4, atol=1e-4)


def test_write_kv_matches_reference():
    k_cache, v_cache = randn(12, 16, 3, 64), randn(12, 16, 3, 64)
    expected_k, expected_v = k_cache.copy(), v_cache.copy()
    kv = randn(40, 2 * 3, 64)                      # k and v as strided halves of one array
    k, v = kv[:, :3], kv[:, 3:]
    slots = RNG.permutation(12 * 16)[:40].astype(np.int64)
    CPU.write_kv(k_cache, v_cache, k, v, slots)
    ref.write_kv(expected_k, expected_v, k, v, slots)
    np.testing.assert_array_equal(k_cache, expected_k)
    np.testing.assert_array_equal(v_cache, expected_v)


@pytest.mark.parametrize("heads,kv_heads,head_dim", HEAD_SHAPES)
@pytest.mark.parametrize("tokens", [1, 37, 600])
def test_rope_write_kv_matches_reference(tokens, heads, kv_heads, head_dim):
    """q, k and v as column slices of one qkv product, slots scattered over the pool, positions
    past the first angle table (4096 rows); the rotated q as the reference's, the caches exactly
    as the reference leaves them (other slots untouched)."""
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim)
    q = qkv[:, :heads * head_dim].reshape(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].reshape(tokens, kv_heads, head_dim)
    positions = RNG.integers(0, 9000, tokens).astype(np.int64)
    blocks = -(-tokens // 16) + 3
    slots = RNG.permutation(blocks * 16)[:tokens].astype(np.int64)
    k_cache, v_cache = randn(blocks, 16, kv_heads, head_dim), randn(blocks, 16, kv_heads, head_dim)
    expected_k, expected_v = k_cache.copy(), v_cache.copy()
    rotated = CPU.rope_write_kv(q, k, v, positions, 100000.0, k_cache, v_cache, slots)
    expected = ref.rope_write_kv(q, k, v, positions, 100000.0, expected_k, expected_v, slots)
    np.testing.assert_allclose(rotated, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k_cache, expected_k, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(v_cache, expected_v)


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 9, SKINNY_MAX_TOKENS, SKINNY_MAX_TOKENS + 1, 300])
@pytest.mark.parametrize("outputs", [960, 49, 50, 51])
def test_float32_linear_matches_reference(tokens, outputs):
    """Every route: the few-token kernels (output counts off their blocks of 4 and 8, token counts
    off the blocks of 4) and
    BLAS on strided rows (x as a column slice of a wider array)."""
    x, w = randn(tokens, 2 * 576)[:, :576], randn(outputs, 576)
    np.testing.assert_allclose(CPU.linear(x, w), ref.linear(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("four_token_passes", [True, False])
@pytest.mark.parametrize("tokens", [6, 7, 9, 10, 11, 32])
@pytest.mark.parametrize("gated", [False, True])
def test_few_token_tiles_match_reference_on_either_register_budget(four_token_passes, tokens, gated):
    """Both tile cascades of `_skinny_matmul` (fours then pairs then one, for AVX-512; pairs then
    one, for AVX2), whichever this host uses, on token counts that leave each remainder."""
    x, w = randn(tokens, 96), randn(2 * 51, 96, scale=0.3)
    got = few_token_matmul(x, w, gated=gated, four_token_passes=four_token_passes)
    product = ref.linear(x, w)
    expected = ref.silu_mul(product) if gated else product
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_wide_vectors_only_where_the_cpu_has_avx512_and_no_width_was_chosen():
    assert cpu_target.wide_vector_features("+avx2,+avx512f,-amx-fp16") == "+avx2,+avx512f,-amx-fp16,-prefer-256-bit"
    assert cpu_target.wide_vector_features("+avx2,-avx512f") is None
    assert cpu_target.wide_vector_features("+avx512f,+prefer-256-bit") is None
    if "NUMBA_CPU_FEATURES" not in os.environ:   # what the kernels of this process compiled with
        host = get_host_cpu_features()
        assert numba.config.CPU_FEATURES == cpu_target.wide_vector_features(host)


def test_a_change_to_any_source_of_the_package_changes_every_kernels_stamp(tmp_path):
    """A kernel inlines helpers from other files, which Numba's own stamp (its file) misses."""
    (tmp_path / "helpers.py").write_text("def exp(x): return x\n")
    (tmp_path / "kernel.py").write_text("from helpers import exp\n")
    (tmp_path / "notes.txt").write_text("not a source")
    before = cpu_target.package_stamp(tmp_path)
    (tmp_path / "notes.txt").write_text("still not a source")
    assert cpu_target.package_stamp.__wrapped__(tmp_path) == before
    (tmp_path / "helpers.py").write_text("def exp(x): return x * 1.0\n")
    assert cpu_target.package_stamp.__wrapped__(tmp_path) != before
    assert "kernels.cpu_target.KernelsInTree" in numba.config.CACHE_LOCATOR_CLASSES


@pytest.mark.parametrize("blas", ["openblas", "mkl"])
def test_each_float32_blas_matches_reference_on_strided_batches(blas):
    """Whichever sgemm `cpu_pool` picks, both give the same products (batched, strided rows)."""
    sgemm = cpu_pool.MKL_SGEMM if blas == "mkl" else cpu_pool._load_openblas_sgemm()
    if sgemm is None:
        pytest.skip(f"{blas} sgemm unavailable here (MKL: the amx extra on an Intel CPU)")
    a, b = randn(3, 70, 2 * 96)[:, :, :96], randn(3, 130, 96)
    np.testing.assert_allclose(cpu_pool.gemm_nt(a, b, gemm=sgemm), a @ b.transpose(0, 2, 1), rtol=1e-5, atol=1e-4)


def test_mkl_sgemm_only_on_intel(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t: fpu avx2\n")
    assert cpu_pool.cpu_vendor(cpuinfo) == "AuthenticAMD"
    monkeypatch.setattr(cpu_pool, "cpu_vendor", lambda: "AuthenticAMD")
    assert cpu_pool._load_mkl_sgemm() is None


# ---------------------------------------------------------------- paged attention
def _random_lengths(count: int, longest: int) -> list[int]:
    return RNG.integers(1, longest + 1, count).tolist()


DECODE_LENGTHS = {"one": [1], "block edges": [15, 16, 17], "long": [300, 2048],
                  "batch 64": _random_lengths(64, 400)}


@pytest.mark.parametrize("heads,kv_heads,head_dim", HEAD_SHAPES)
@pytest.mark.parametrize("lengths", DECODE_LENGTHS.values(), ids=DECODE_LENGTHS.keys())
def test_decode_attention_matches_reference(lengths, heads, kv_heads, head_dim):
    k_cache, v_cache, tables, _ = paged(lengths, heads, kv_heads, head_dim)
    q, context = randn(len(lengths), heads, head_dim), np.array(lengths, np.int32)
    scale = head_dim ** -0.5
    np.testing.assert_allclose(CPU.decode_attention(q, k_cache, v_cache, tables, context, scale),
                               ref.decode_attention(q, k_cache, v_cache, tables, context, scale), **ATTN_TOL)


# (context lengths, queries per sequence): whole prompts, chunked prefills whose queries are the last
# tokens of a longer context, and both sides of the switch to tiles (TILE_MIN_QUERIES queries and
# TILE_MIN_WORK query x key pairs)
_FEW, _WORK = cpu_attention.TILE_MIN_QUERIES, cpu_attention.TILE_MIN_WORK
PREFILL_CASES = {
    "one token": ([1], [1]),
    "block edges": ([15, 16, 17], [15, 16, 17]),
    "300 whole": ([300], [300]),
    "chunks": ([300, 2048, 17, 200, 64, 63], [168, _FEW - 1, 5, _FEW, 64, 63]),
    "work edge": ([_WORK // _FEW, _WORK // _FEW - 1], [_FEW, _FEW]),
    "batch 64": (lengths := _random_lengths(64, 40), lengths),
}


PREFILL_PARAMS = [pytest.param(*case, *heads, id=f"{name}-{'-'.join(map(str, heads))}")
                  for name, case in PREFILL_CASES.items() for heads in HEAD_SHAPES]
PREFILL_PARAMS.append(pytest.param([2048], [2048], 9, 3, 64, id="2048 whole-9-3-64"))  # the reference is slow here


@pytest.mark.parametrize("lengths,query_lens,heads,kv_heads,head_dim", PREFILL_PARAMS)
def test_prefill_attention_matches_reference(lengths, query_lens, heads, kv_heads, head_dim):
    k_cache, v_cache, tables, _ = paged(lengths, heads, kv_heads, head_dim)
    q = randn(sum(query_lens), heads, head_dim)
    query_start = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    args = (q, k_cache, v_cache, tables, query_start, np.array(lengths, np.int32), head_dim ** -0.5)
    np.testing.assert_allclose(CPU.prefill_attention(*args), ref.prefill_attention(*args), **ATTN_TOL)


# ---------------------------------------------------------------- whole model, threads
def greedy_outputs(kernels, wrap=lambda model: model) -> list[list[int]]:
    """Six prompts (1 to 40 tokens) joining a running batch two steps apart, 12 greedy tokens each,
    on the tiny model (`wrap`ped, e.g. in `CpuDecodeModel`); every KV block is free at the end."""
    model = LlamaModel(TINY, LlamaWeights.from_hf(random_tensors(TINY, seed=0), TINY, kernels), kernels)
    instance = Instance(wrap(model), num_blocks=64)
    seqs = []
    for n in (1, 5, 15, 16, 17, 40):
        seqs.append(instance.add_request(random_prompt(n, seed=n), SamplingParams(max_tokens=12, ignore_eos=True)))
        instance.step()
        instance.step()
    run_to_end(instance)
    assert instance.kv.num_used_blocks == 0
    return [seq.output_ids for seq in seqs]


def test_tiny_model_greedy_tokens_match_reference():
    expected = greedy_outputs(get_kernels("reference"))
    assert greedy_outputs(CpuKernels(bf16=False)) == expected
    assert greedy_outputs(get_kernels("cpu")) == expected   # steps here stay below the bf16 threshold



def test_every_kernel_compiled_here_is_cached_on_disk():
    """`cache=True` pays only if Numba can save the machine code: a kernel that reads a ctypes
    pointer or a large global array (`numba.get_num_threads()` called inside a kernel is one) is
    compiled afresh by every process, with nothing but a warning, and so is a closure over another
    compiled function. So: run the tiny model (with the bf16 GEMMs and attention where this CPU
    has them, and a decode step in one region, float32 and bf16 weights) and find each compiled
    kernel on disk, under a key the next process computes alike and stamped with the whole
    package's sources (`cpu_target`: a kernel inlines helpers of other files)."""
    greedy_outputs(CpuKernels(bf16=bf16.unavailable_reason() is None, bf16_min_tokens=16, bf16_weights=True))
    if bf16.unavailable_reason() is None:
        k_cache, v_cache, tables, _ = paged([600], 9, 3, 64)
        cpu_attention.prefill_attention(randn(600, 9, 64), k_cache, v_cache, tables, np.array([0, 600], np.int32),
                                        np.array([600], np.int32), 0.125, bf16.Bf16Matmul.create())
    step = decode_step(TINY, 2, 20, np.random.default_rng(0))
    for kernels in (CPU, CpuKernels(bf16=False, bf16_weights=True)):
        tiny = LlamaModel(TINY, LlamaWeights.from_hf(random_tensors(TINY, seed=0), TINY, kernels), kernels)
        CpuDecodeModel(tiny).forward(step, *random_cache(tiny, int(step.block_tables.size)))
    modules = (amx_tiles, avx512_bf16, bf16, bf16_gemm, bf16_gemv, bf16_layout, cpu, cpu_attention, cpu_decode_attention,
               cpu_decode_step, cpu_math, cpu_pool, few_token_gemm)
    kernels = [v for m in modules for v in vars(m).values() if isinstance(v, CPUDispatcher) and v.signatures]
    group = TINY.num_attention_heads // TINY.num_key_value_heads   # the per-shape closures, at the tiny model's shape
    kernels += [cpu_decode_attention._attention(TINY.head_dim, group, 16),
                cpu_decode_step._program(TINY.head_dim, group, 16, TINY.num_key_value_heads)]
    assert len(kernels) > 10
    for kernel in kernels:
        name = f"{kernel.py_func.__module__}.{kernel.py_func.__qualname__}"
        assert isinstance(kernel._cache._impl._locator, cpu_target._PackageStamped), name
        for signature in kernel.signatures:
            assert kernel._cache.load_overload(signature, kernel.targetctx) is not None, f"{name} is not cached"
        # the cache key pickles a closure's variables: a compiled function among them pickles with an id
        # of this process, so the next process would find no entry and compile again
        cells = [cell.cell_contents for cell in kernel.py_func.__closure__ or ()]
        assert all(isinstance(value, (int, float, bool, str)) for value in cells), f"{name} closes over {cells}"


def test_kernels_run_beside_a_busy_python_thread():
    """Numba kernels are nogil: a pure-Python loop holding the GIL in another thread keeps counting
    while a long kernel runs, and does not stall it (2 cores: the kernel may lose about one of them)."""
    lengths = [2048] * 16
    k_cache, v_cache, tables, _ = paged(lengths, 9, 3, 64)
    q, context = randn(len(lengths), 9, 64), np.array(lengths, np.int32)

    def attention_s() -> float:
        started = time.perf_counter()
        CPU.decode_attention(q, k_cache, v_cache, tables, context, 0.125)
        return time.perf_counter() - started

    attention_s()
    alone = min(attention_s() for _ in range(3))
    counted, stop = [0], threading.Event()

    def busy() -> None:
        while not stop.is_set():
            counted[0] += 1

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        time.sleep(0.01)
        before = counted[0]
        beside = min(attention_s() for _ in range(3))
        progress = counted[0] - before
    finally:
        stop.set()
        thread.join()
    assert progress > 1000, "the Python thread stalled while the kernel ran: the kernel holds the GIL"
    assert beside < 4 * alone + 0.01, f"kernel {alone * 1e3:.1f} ms alone, {beside * 1e3:.1f} ms beside a busy thread"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator setting is glibc's")
def test_freed_step_buffers_are_reused_without_page_faults():
    """After `keep_freed_memory` (every CpuKernels sets it), a 16 MiB array allocated again after
    being freed lands on pages already mapped: filling it faults (almost) nothing in."""
    assert cpu_memory.keep_freed_memory()
    np.ones(4 << 20, np.float32)            # allocated, touched, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    np.ones(4 << 20, np.float32)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 16
