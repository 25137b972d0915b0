"""The bf16 GEMM route (AMX tiles, or AVX512-BF16 dot products): rounding, accumulation, the weight
cache, and how CpuKernels uses it. Kernel-level tests run on each route this CPU has.

Tolerances: bf16 keeps 8 significant bits, so a product over 576 inputs of size ~1 lands within
~1% of its float32 value (checked as 2e-2 of the output scale); against the same bf16-rounded inputs
multiplied in float32 it agrees to float32 rounding (1e-4), which is what shows the accumulation is
float32.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

from kernels import avx512_bf16, bf16, bf16_gemm, cpu_attention
from kernels.bf16_layout import TileRows, TileWeight
from kernels import reference as ref
from kernels.cpu import CpuKernels
from models.llama import LlamaModel, LlamaWeights
from models.random_weights import TINY, random_tensors
from tests.conftest import random_prompt
from tests.kernels.test_reference import paged
from tests.models.test_golden import forward_whole

RNG = np.random.default_rng(77)
needs_amx = pytest.mark.skipif(bf16.amx_unavailable_reason() is not None,
                               reason=f"AMX tiles unavailable: {bf16.amx_unavailable_reason()}")
needs_bf16 = pytest.mark.skipif(bf16.unavailable_reason() is not None,
                                reason=f"no bf16 route: {bf16.unavailable_reason()}")
ROUTES = [pytest.param(bf16_gemm.AMX, marks=needs_amx, id="amx"),
          pytest.param(bf16_gemm.AVX512_BF16, id="avx512_bf16",
                       marks=pytest.mark.skipif(not avx512_bf16.cpu_has_avx512_bf16(),
                                                reason="this CPU does not report avx512_bf16 in /proc/cpuinfo"))]


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def test_to_bf16_rounds_to_nearest_even_like_ml_dtypes():
    import ml_dtypes  # the test extra declares it
    x = np.concatenate([randn(10_000) * 1e3, randn(1000) * 1e-30, [0.0, -0.0, np.inf, -np.inf, 1.00390625]])
    x = x.astype(np.float32)
    np.testing.assert_array_equal(bf16.to_bf16(x), x.astype(ml_dtypes.bfloat16).view(np.uint16))
    np.testing.assert_array_equal(bf16.from_bf16(bf16.to_bf16(x)), x.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_unavailable_route_falls_back_or_raises(monkeypatch):
    monkeypatch.setattr(bf16, "unavailable_reason", lambda: "no bf16 here (test)")
    assert CpuKernels(bf16=None).bf16 is None
    assert CpuKernels(bf16=False).bf16 is None
    with pytest.raises(RuntimeError, match="no bf16 here"):
        CpuKernels(bf16=True)


def test_route_is_amx_where_granted_else_the_dot_products(monkeypatch):
    """AMX first; without it AVX512-BF16; neither: none."""
    monkeypatch.setattr(bf16, "amx_unavailable_reason", lambda: None)
    assert bf16.Bf16Matmul().unit == "AMX"
    monkeypatch.setattr(bf16, "amx_unavailable_reason", lambda: "no AMX (test)")
    monkeypatch.setattr(avx512_bf16, "cpu_has_avx512_bf16", lambda: True)
    assert bf16.unavailable_reason() is None
    assert bf16.Bf16Matmul().unit == "AVX512-BF16"
    monkeypatch.setattr(avx512_bf16, "cpu_has_avx512_bf16", lambda: False)
    assert bf16.unavailable_reason() == "no AMX (test), nor avx512_bf16"
    assert bf16.Bf16Matmul.create() is None


def test_block_product_stubs_say_they_run_only_inside_numba():
    with pytest.raises(NotImplementedError, match="compiled into Numba kernels"):
        bf16_gemm.product_block(bf16_gemm.AMX, *[0] * 9)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("tokens,outputs,inputs", [(1, 960, 576), (64, 3072, 576), (300, 576, 1536), (7, 5, 3)])
def test_bf16_matmul_accumulates_in_float32(route, tokens, outputs, inputs):
    gemm = bf16.Bf16Matmul(route)
    x, w = randn(tokens, inputs), randn(outputs, inputs)
    out = gemm.matmul(x, w)
    rounded = bf16.from_bf16(bf16.to_bf16(x)) @ bf16.from_bf16(bf16.to_bf16(w)).T
    np.testing.assert_allclose(out, rounded, rtol=1e-4, atol=1e-4)
    exact = x @ w.T
    assert np.abs(out - exact).max() <= 2e-2 * np.abs(exact).max()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("tokens", [1, 31, 32, 33, 100, 2100])
@pytest.mark.parametrize("outputs,inputs", [(64, 576), (50, 70), (3072, 576), (576, 1536)])
def test_gemm_equals_float32_products_of_the_rounded_inputs(route, tokens, outputs, inputs):
    """`bf16_gemm.matmul` on each route across tile, pair, micro-kernel and work-item edges (2100
    tokens: five chunks of 16
    token blocks, the last one partial), with padded rows, outputs and inputs; the result is
    contiguous when O fills tiles."""
    x, w = randn(tokens, inputs), randn(outputs, inputs)
    out = bf16_gemm.matmul(route, TileRows.convert(x), TileWeight.pack(w))
    rounded = bf16.from_bf16(bf16.to_bf16(x)).astype(np.float64) @ bf16.from_bf16(bf16.to_bf16(w)).astype(np.float64).T
    assert out.shape == (tokens, outputs) and (out.flags.c_contiguous or outputs % 32)
    np.testing.assert_allclose(out, rounded, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("tokens", [33, 100, 600])
def test_gemms_give_the_same_bits_on_one_thread_and_on_all(route, tokens):
    """Work items split the tokens by thread count (one thread: chunks of 16 token blocks; two:
    half the blocks each), which moves only which thread computes a block, never its sum."""
    x, w, gate_up = randn(tokens, 576), randn(96, 576), randn(192, 576) * 0.2
    rows, weight, gated = TileRows.convert(x), TileWeight.pack(w), TileWeight.pack_gated(gate_up)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        alone = bf16_gemm.matmul(route, rows, weight).copy(), bf16_gemm.swiglu(route, rows, gated).tiles
    finally:
        numba.set_num_threads(threads)
    assert np.array_equal(bf16_gemm.matmul(route, rows, weight), alone[0])
    assert np.array_equal(bf16_gemm.swiglu(route, rows, gated).tiles, alone[1])


def test_tile_layouts_place_each_element():
    """TileRows: (t, i) at [t // 16, i // 32, t % 16, i % 32]; TileWeight: (o, i) at
    [o // 16, i // 2, o % 16, i % 2]; padding zero."""
    x = randn(40, 70)
    rows = TileRows.convert(x).tiles
    bits = bf16.to_bf16(x)
    t, i = np.meshgrid(np.arange(40), np.arange(70), indexing="ij")
    np.testing.assert_array_equal(rows[t // 16, i // 32, t % 16, i % 32], bits)
    assert rows.shape == (4, 3, 16, 32) and not rows[2:, :, 8:].any() and not rows[:, 2, :, 6:].any()
    w = randn(50, 70)
    tiles = TileWeight.pack(w).tiles
    o, i = np.meshgrid(np.arange(50), np.arange(70), indexing="ij")
    np.testing.assert_array_equal(tiles[o // 16, i // 2, o % 16, i % 2], bf16.to_bf16(w))
    assert tiles.shape == (4, 48, 16, 2) and not tiles[3, :, 2:].any() and not tiles[:, 35:].any()


def test_gated_layout_interleaves_gate_and_up_by_sixteen_outputs():
    """Tile rows 2j and 2j+1 hold gate and up outputs 16j..16j+15; F = 20 pads both to 32."""
    gate_up = randn(40, 70)
    packed = TileWeight.pack_gated(gate_up)
    rows = packed.tiles.transpose(0, 2, 1, 3).reshape(64, -1)[:, :70]
    bits = bf16.to_bf16(gate_up)
    assert packed.outputs == 20 and packed.tiles.shape == (4, 48, 16, 2)
    np.testing.assert_array_equal(rows[0:16], bits[0:16])
    np.testing.assert_array_equal(rows[16:32], bits[20:36])
    np.testing.assert_array_equal(rows[32:36], bits[16:20])
    np.testing.assert_array_equal(rows[48:52], bits[36:40])
    assert not rows[36:48].any() and not rows[52:].any()


def test_tiled_weight_copy_is_made_once_and_dropped_with_the_weight():
    """The copies are process-wide: every kernels object (each instance has its own) finds the
    same one. Packing needs no bf16 hardware."""
    w = randn(64, 32)
    first, key = bf16.tiled_weight(w), bf16.tile_key(w)
    assert bf16.tiled_weight(w) is first
    assert key in bf16._TILED
    del w
    gc.collect()
    assert key not in bf16._TILED


def test_views_of_one_buffer_share_a_bf16_copy_that_lives_while_one_of_them_does():
    """Instances loaded from one host-cache entry hold different view objects of the same memory;
    the copy goes with the last of them, even though the buffer lives on (an unloaded instance
    must not leave its copies behind in the host cache)."""
    buffer = randn(2, 64, 32)
    first, second, other = buffer[1], buffer[1][...], buffer[0]
    assert first is not second
    assert bf16.tiled_weight(first) is bf16.tiled_weight(second)
    assert bf16.tiled_weight(other) is not bf16.tiled_weight(first)
    key = bf16.tile_key(first)
    del first
    gc.collect()
    assert key in bf16._TILED                # `second` still uses it
    del second
    gc.collect()
    assert key not in bf16._TILED and bf16.tile_key(other) in bf16._TILED


@needs_bf16
def test_cpu_kernels_use_bf16_only_from_the_token_threshold():
    kernels = CpuKernels(bf16=True, bf16_min_tokens=16)
    w = randn(96, 64)
    small, large = randn(15, 64), randn(16, 64)
    np.testing.assert_allclose(kernels.linear(small, w), ref.linear(small, w), rtol=1e-5, atol=1e-4)
    assert bf16.tile_key(w) not in bf16._TILED
    np.testing.assert_allclose(kernels.linear(large, w), kernels.bf16.matmul(large, w), rtol=0, atol=0)
    assert bf16.tile_key(w) in bf16._TILED


@needs_bf16
def test_bf16_mlp_rounds_its_silu_output_for_the_down_gemm():
    """The bf16 MLP equals its three steps done apart in bf16: gate/up GEMM, SiLU rounded to bf16,
    down GEMM (float32 accumulation throughout), and stays within bf16 error of float32."""
    kernels = CpuKernels(bf16=True)
    x, gate_up, down = randn(100, 576), randn(2 * 1536, 576) * 0.05, randn(576, 1536) * 0.05
    got = kernels.mlp(x, gate_up, down)
    # the float32 SiLU with the same exp as the fused one: numpy's exp would round some of its
    # values to the neighbouring bf16, and those move outputs by ~1e-3
    act = kernels.silu_mul(kernels.bf16.matmul(x, gate_up))
    np.testing.assert_allclose(got, kernels.bf16.matmul(act, down), rtol=1e-4, atol=1e-4)
    exact = ref.mlp(x, gate_up, down)
    assert np.abs(got - exact).max() <= 2e-2 * np.abs(exact).max()


@needs_bf16
def test_tiny_model_prefill_logits_with_bf16_stay_close():
    """A 100-token prefill with every GEMM in bf16: logits within 2e-2 of the scale of float32's."""
    tensors = random_tensors(TINY, seed=0)
    prompt = random_prompt(100, seed=3)

    def logits(kernels) -> np.ndarray:
        return forward_whole(LlamaModel(TINY, LlamaWeights.from_hf(tensors, TINY, kernels), kernels), prompt)

    expected = logits(ref.ReferenceKernels())
    got = logits(CpuKernels(bf16=True, bf16_min_tokens=1))
    assert np.abs(got - expected).max() <= 2e-2 * np.abs(expected).max()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 2, 128), (4, 4, 64), (8, 2, 64)])
def test_bf16_prefill_attention_stays_close(route, heads, kv_heads, head_dim):
    """The flash-style bf16 tiles: whole prompts across query-tile and key-block edges, chunks that
    continue a context (queries straddling a key block), and a short one left to the paged kernel.
    Outputs (~N(0, 1) values mixed) within 3e-2 of float32."""
    lengths = [600, 900, 200, 257, 1100, 40]
    query_lens = [600, 700, 150, 257, 130, 10]
    k_cache, v_cache, tables, _ = paged(lengths, heads, kv_heads, head_dim)
    q = randn(sum(query_lens), heads, head_dim)
    query_start = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    args = (q, k_cache, v_cache, tables, query_start, np.array(lengths, np.int32), head_dim ** -0.5)
    got = cpu_attention.prefill_attention(*args, bf16=bf16.Bf16Matmul(route))
    np.testing.assert_allclose(got, ref.prefill_attention(*args), atol=3e-2)


BF16_GOLDEN_TOKENS = 16   # issue 5: greedy output with bf16 prefill must match the float32 golden this far


@needs_bf16
@pytest.mark.parametrize("case", range(8))
def test_greedy_with_bf16_matches_golden_for_16_tokens(model_home, golden_dir, case):
    """The real model with every prefill of 2+ tokens on this CPU's bf16 route (bf16 GEMMs, and on
    AMX attention; the default threshold of 64 would leave all but one golden prompt float32) and
    decode float32 keeps the golden greedy tokens this far."""
    from refengine.engine.instance import Instance
    from refengine.engine.loader import load_model
    from refengine.engine.sequence import SamplingParams
    from tests.conftest import run_to_end
    c = json.loads((golden_dir / "greedy.json").read_text())["cases"][case]
    model = load_model("smollm2-135m-instruct", CpuKernels(bf16=True, bf16_min_tokens=2), home=model_home).model
    instance = Instance(model, num_blocks=64)
    seq = instance.add_request(c["prompt_ids"], SamplingParams(max_tokens=BF16_GOLDEN_TOKENS, ignore_eos=True))
    run_to_end(instance)
    assert seq.output_ids == c["completion_ids"][:BF16_GOLDEN_TOKENS]


@pytest.mark.parametrize("route", ROUTES)
def test_bf16_prefill_attention_rescales_when_later_keys_dwarf_the_running_max(route):
    """Keys 300-699 score ~40x higher than the first ones (exps 2^100 and more above the first
    block's max) and keys 700+ lower again: the lazy max must rescale, not overflow. Scores that
    large make bf16's rounding of q and k itself move the output by up to ~0.5, so the check is
    against float32 attention over the bf16-rounded q, k and v, which leaves the probabilities'
    rounding and the max handling."""
    heads, kv_heads, head_dim, length = 9, 3, 64, 1000
    k_cache, v_cache, tables, _ = paged([length], heads, kv_heads, head_dim)
    slots = tables[0, np.arange(length) // 16].astype(np.int64) * 16 + np.arange(length) % 16
    k_cache[slots[300:700] // 16, slots[300:700] % 16] *= 40.0
    q = randn(length, heads, head_dim)
    meta = (tables, np.array([0, length], np.int32), np.array([length], np.int32), head_dim ** -0.5)
    got = cpu_attention.prefill_attention(q, k_cache, v_cache, *meta, bf16=bf16.Bf16Matmul(route))
    assert np.isfinite(got).all()
    rounded = [bf16.from_bf16(bf16.to_bf16(a)) for a in (q, k_cache, v_cache)]
    np.testing.assert_allclose(got, ref.prefill_attention(*rounded, *meta), atol=3e-2)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("tokens,features,inputs", [(33, 40, 70), (100, 1536, 576), (64, 96, 64), (600, 96, 64)])
def test_swiglu_equals_silu_of_the_two_gemms(route, tokens, features, inputs):
    """The gate/up GEMM with SiLU in its epilogue (`Bf16Matmul.swiglu`) against silu(gate) * up of
    the plain tile GEMMs, rounded to bf16; F not a multiple of 16 or 32 leaves zero padding; 600
    tokens span two token chunks of a work item."""
    gemm = bf16.Bf16Matmul(route)
    x, gate_up = randn(tokens, inputs), randn(2 * features, inputs) * 0.2
    act = gemm.swiglu(x, gate_up)
    padded = act.tiles.transpose(0, 2, 1, 3).reshape(act.tiles.shape[0] * 16, -1)
    expected = bf16.to_bf16(ref.silu_mul(gemm.matmul(x, gate_up)))
    got = padded[:tokens, :features]
    np.testing.assert_allclose(bf16.from_bf16(got), bf16.from_bf16(expected), rtol=1e-2, atol=1e-3)
    assert not padded[tokens:].any() and not padded[:, features:].any()


AMX_COMPILE = """
from numba import types
from kernels import bf16_gemm, cpu_attention
route, u16, f32, i = types.Array(types.uint8, 1, "C"), types.uint16, types.float32, types.intp
arr = lambda dtype, dims: types.Array(dtype, dims, "C")
kernels = {
    bf16_gemm._matmul: (route, arr(u16, 4), arr(u16, 4), arr(f32, 2), i),
    bf16_gemm._swiglu: (route, arr(u16, 4), arr(u16, 4), arr(u16, 4), i),
    cpu_attention._flash_bf16: (route, arr(u16, 3), arr(u16, 5), arr(u16, 5), i, i, i, i, f32, arr(f32, 3)),
}
for kernel, signature in kernels.items():
    kernel.compile(signature)
    asm = kernel.inspect_asm(signature)
    print(kernel.__name__, *(asm.count(op) for op in ("ldtilecfg", "tileloadd", "tdpbf16ps", "tilerelease")))
"""


@pytest.mark.skipif(bf16.amx_unavailable_reason() is None, reason="this CPU has AMX: the AMX tests run it")
def test_amx_kernels_compile_for_a_sapphire_rapids_target(tmp_path):
    """Where no AMX CPU is at hand, the AMX specialisations of the shared bf16 kernel bodies must at
    least still type and lower: compiled (never run) for Sapphire Rapids in a child process, with a
    cache of its own, each holds the tile configure, load, bf16 dot product and release."""
    env = dict(os.environ, NUMBA_CPU_NAME="sapphirerapids", NUMBA_CPU_FEATURES="",
               NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", AMX_COMPILE], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    counts = {name: [int(n) for n in rest] for name, *rest in (line.split() for line in done.stdout.splitlines())}
    assert set(counts) == {"_matmul", "_swiglu", "_flash_bf16"}
    for name, (configure, loads, products, release) in counts.items():
        assert configure >= 1 and release >= 1 and loads >= 4 and products >= 4, (name, counts[name])
