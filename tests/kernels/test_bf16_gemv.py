"""The bf16-weight GEMVs (`kernels.bf16_gemv`) and `CpuKernels(bf16_weights=True)`: decode steps of
1-5 sequences reading the weights' bf16 copies, widened to float32 in registers.

Tolerance: against the same bf16-rounded weights multiplied in float64 the GEMV agrees to float32
rounding (outputs up to ~130 in size here, so 2e-4 absolute): only the weights are rounded, which
is what shows the activations stay float32. These need no bf16 hardware, so they run everywhere.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from kernels import bf16_gemv
from kernels import reference as ref
from kernels.bf16 import tiled_weight
from kernels.bf16_layout import TileWeight
from kernels.cpu import CpuKernels
from tests.kernels.test_bf16 import BF16_GOLDEN_TOKENS

RNG = np.random.default_rng(91)


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def bf16_rounded(w: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bf16 (round to nearest even), as float32: what the copies hold."""
    bits = w.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("rows,outputs,inputs", [(1, 960, 576), (2, 576, 576), (3, 1536, 576), (1, 50, 70),
                                                 (2, 40, 71), (3, 17, 1), (1, 3072, 1536), (2, 16, 2),
                                                 (4, 960, 576), (5, 33, 70)])
@pytest.mark.parametrize("pass_tokens", [1, 2, 3, bf16_gemv.MOST_ROWS])
def test_gemv_equals_the_bf16_rounded_weights_in_float64(rows, outputs, inputs, pass_tokens):
    """Widths odd or not a multiple of 32 (zero-padded pairs) and outputs not a multiple of 16; the
    tokens in one pass per weight block or several (AVX2 takes 4 as 2 + 2), whatever this host does."""
    x, w = randn(rows, inputs), randn(outputs, inputs)
    got = bf16_gemv.gemv(x, TileWeight.pack(w), pass_tokens)
    expected = x.astype(np.float64) @ bf16_rounded(w).astype(np.float64).T
    assert got.shape == (rows, outputs) and got.flags.c_contiguous
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4)


@pytest.mark.parametrize("rows,features,inputs", [(1, 1536, 576), (3, 40, 70), (2, 20, 33), (5, 24, 64)])
def test_swiglu_equals_silu_of_the_two_gemvs(rows, features, inputs):
    """Against float64 products of the rounded weights: gate and up (up to ~5 here) carry float32
    sums' error (~5e-6), which their product multiplies, hence 1e-4 absolute (1e-5 failed on some
    draws of the inputs)."""
    x, gate_up = randn(rows, inputs), randn(2 * features, inputs) * 0.2
    rounded = bf16_rounded(gate_up).astype(np.float64)
    expected = ref.silu_mul(x.astype(np.float64) @ rounded.T)
    np.testing.assert_allclose(bf16_gemv.swiglu(x, TileWeight.pack_gated(gate_up)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [0, 6])
def test_more_rows_than_the_gemv_takes_is_refused(rows):
    with pytest.raises(ValueError, match="1 to 5 rows"):
        bf16_gemv.gemv(randn(rows, 32), TileWeight.pack(randn(16, 32)))


def test_cpu_kernels_read_bf16_weights_only_for_steps_of_up_to_five_tokens():
    """Off by default; on, 1-5 rows read the copies (exactly the GEMV's result) and 6+ the float32
    weights, as before."""
    w, gate_up, down = randn(96, 64), randn(80, 64) * 0.2, randn(64, 40) * 0.2
    on, off = CpuKernels(bf16=False, bf16_weights=True), CpuKernels(bf16=False)
    few, more = randn(5, 64), randn(6, 64)
    np.testing.assert_array_equal(on.linear(few, w), bf16_gemv.gemv(few, tiled_weight(w)))
    np.testing.assert_allclose(off.linear(few, w), ref.linear(few, w), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(on.linear(more, w), off.linear(more, w))
    expected = ref.linear(ref.silu_mul(ref.linear(few, bf16_rounded(gate_up))), bf16_rounded(down))
    np.testing.assert_allclose(on.mlp(few, gate_up, down), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(on.mlp(more, gate_up, down), off.mlp(more, gate_up, down))


@pytest.mark.parametrize("case", range(8))
def test_greedy_with_bf16_weights_matches_golden_for_16_tokens(model_home, golden_dir, case):
    """The real model decoding from its bf16 weight copies (prefill float32) keeps the float32
    golden greedy tokens this far (measured: all 48 in 7 cases, 16 in case 1)."""
    from refengine.engine.instance import Instance
    from refengine.engine.loader import load_model
    from refengine.engine.sequence import SamplingParams
    from tests.conftest import run_to_end
    c = json.loads((golden_dir / "greedy.json").read_text())["cases"][case]
    model = load_model("smollm2-135m-instruct", CpuKernels(bf16=False, bf16_weights=True), home=model_home).model
    instance = Instance(model, num_blocks=64)
    seq = instance.add_request(c["prompt_ids"], SamplingParams(max_tokens=BF16_GOLDEN_TOKENS, ignore_eos=True))
    run_to_end(instance)
    assert seq.output_ids == c["completion_ids"][:BF16_GOLDEN_TOKENS]
