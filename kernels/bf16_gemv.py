"""GEMVs over bf16 weights for the steps of a few tokens (decode of 1-5 sequences), which read every
weight once per step and so run at the memory's speed: reading the weights' bf16 copies (half the
bytes of float32) instead of the float32 originals makes such a step up to twice as fast. Only the
weights are bf16; each is widened to float32 in registers and multiplied by float32 activations
with float32 accumulation, so the one rounding is the weights' (as when a model is served from its
bf16 checkpoint), and no bf16 instruction is needed: any AVX-512 CPU runs it, and AVX2 ones too.

The weights are the prefill GEMMs' copies (`kernels.bf16_layout.TileWeight`, shared with them): per
16 outputs, one contiguous run of 64-byte rows, each holding one input pair of the 16 outputs
(16 x 2 bf16). Per row the micro-kernel (`_block_rows`) widens the 32 bf16 to 32 float32 (zero
extend, shift by 16: a bf16 is the top half of a float32), multiplies them by the token's input
pair broadcast to all lanes (x[2p], x[2p+1], x[2p], ...) and accumulates, and at the end adds each
output's two lanes. Numba has no vector values, so, like `kernels.avx512_bf16`, it is an intrinsic
that emits its loop in LLVM IR.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels.bf16_layout import TileWeight
from kernels.cpu_math import JIT, silu_times
from kernels.cpu_target import HOST_AVX512
from kernels.ir_loop import accumulate_loop

MOST_ROWS = 5        # tokens per call, each with 2 accumulator registers (as the float32 GEMV, `kernels.few_token_gemm._gemv`)

_I16, _I32, _I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32X32, _I16X32, _I32X32, _I64X16 = (ir.VectorType(ir.FloatType(), 32), ir.VectorType(_I16, 32),
                                      ir.VectorType(_I32, 32), ir.VectorType(_I64, 16))
_F32X16 = ir.VectorType(ir.FloatType(), 16)


def _address(builder, base, offset):
    return builder.add(base, offset if isinstance(offset, ir.Value) else ir.Constant(_I64, offset))


def _block_rows_intrinsic(rows: int):
    """float32 [rows, 16] at byte address out (rows `out_stride` bytes apart) = `rows` float32 rows
    of inputs at x (`x_stride` bytes apart) @ the 16 outputs of one `TileWeight` block at w, over
    `pairs` input pairs (at least one)."""
    def typer(typingctx, x, x_stride, w, pairs, out, out_stride):
        def codegen(context, builder, signature, args):
            x, x_stride, w, pairs, out, out_stride = args
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32X32, [_F32X32] * 3),
                                                 "llvm.fma.v32f32")
            x_rows = [_address(builder, x, builder.mul(x_stride, ir.Constant(_I64, r))) for r in range(rows)]

            def step(p, acc):                            # one input pair: one 64-byte row of the block
                row = builder.inttoptr(_address(builder, w, builder.mul(p, ir.Constant(_I64, 64))),
                                       _I16X32.as_pointer())
                bits = builder.shl(builder.zext(builder.load(row, align=2), _I32X32), ir.Constant(_I32X32, [16] * 32))
                weights = builder.bitcast(bits, _F32X32)
                for r in range(rows):
                    pair_at = builder.inttoptr(_address(builder, x_rows[r], builder.mul(p, ir.Constant(_I64, 8))),
                                               _I64.as_pointer())
                    lane0 = builder.insert_element(ir.Constant(_I64X16, ir.Undefined),
                                                   builder.load(pair_at, align=4), ir.Constant(_I32, 0))
                    inputs = builder.shuffle_vector(lane0, ir.Constant(_I64X16, ir.Undefined),
                                                    ir.Constant(ir.VectorType(_I32, 16), [0] * 16))
                    acc[r] = builder.call(fma, [weights, builder.bitcast(inputs, _F32X32), acc[r]])
                return acc

            totals = accumulate_loop(builder, "gemv", pairs, [ir.Constant(_F32X32, [0.0] * 32)] * rows, step)
            for r, total in enumerate(totals):           # each output's two lanes (its input pair) added
                even = builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(_I32, 16), list(range(0, 32, 2))))
                odd = builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(_I32, 16), list(range(1, 32, 2))))
                target = _address(builder, out, builder.mul(out_stride, ir.Constant(_I64, r)))
                builder.store(builder.fadd(even, odd), builder.inttoptr(target, _F32X16.as_pointer()), align=4)
            return context.get_dummy_value()
        return types.void(*[types.intp] * 6), codegen
    typer.__name__ = typer.__qualname__ = f"_block_rows_{rows}"
    return intrinsic(typer)


_block_1, _block_2, _block_3, _block_4, _block_5 = (_block_rows_intrinsic(r) for r in range(1, MOST_ROWS + 1))


@numba.njit(inline="always", nogil=True, cache=True)
def block_rows(rows, x, x_stride, w, pairs, out, out_stride):
    """The micro-kernel for `rows` tokens (its unrolled row count is fixed at compile time); also
    inlined into the one-region decode step (`kernels.cpu_decode_step`)."""
    if rows == 1:
        _block_1(x, x_stride, w, pairs, out, out_stride)
    elif rows == 2:
        _block_2(x, x_stride, w, pairs, out, out_stride)
    elif rows == 3:
        _block_3(x, x_stride, w, pairs, out, out_stride)
    elif rows == 4:
        _block_4(x, x_stride, w, pairs, out, out_stride)
    else:
        _block_5(x, x_stride, w, pairs, out, out_stride)


@numba.njit(parallel=True, nogil=True, cache=True)
def _gemv(x, tiles, out, pass_tokens):
    """out [R, O padded to 16s] = x [R, 2 * pairs] @ the weight's tiles [O/16, pairs(+padding), 16, 2],
    each block against up to `pass_tokens` tokens at a time."""
    pairs = x.shape[1] // 2
    block_bytes = tiles.shape[1] * 64
    rows = x.shape[0]
    for b in prange(tiles.shape[0]):
        t = 0
        while t < rows:
            tokens = min(rows - t, pass_tokens)
            block_rows(tokens, x.ctypes.data + t * x.strides[0], x.strides[0], tiles.ctypes.data + b * block_bytes,
                   pairs, out.ctypes.data + b * 64 + t * out.strides[0], out.strides[0])
            t += tokens


@numba.njit(parallel=True, **JIT)
def _swiglu(gate_up, act):
    """act [R, F] = silu(gate) * up of a gated GEMV's output, whose blocks alternate 16 gate and
    16 up outputs (`TileWeight.pack_gated`)."""
    for t in range(act.shape[0]):
        for j in prange(act.shape[1]):
            block, i = j >> 4, j & 15
            act[t, j] = silu_times(gate_up[t, 32 * block + i], gate_up[t, 32 * block + 16 + i])


def tokens_per_pass(rows: int) -> int:
    """How many of `rows` tokens one micro-kernel pass takes against a weight block; the others go
    in further passes over the same block, read again from L1. All of them, except 4 on AVX2: a
    token's accumulator (32 floats, two AVX-512 registers) takes four of AVX2's 16, and LLVM's
    4-token pass spills badly there. On a Zen 3 VM over the model's weights, 4 tokens read 13.6 GB/s
    in one pass and 20.0 as 2 + 2 (whole decode steps at batch 4: 1.35-1.42x); 5 in one pass read
    18.8, and as 3 + 2 came out 0.91-0.97x in whole steps, so they stay in one pass."""
    return 2 if rows == 4 and not HOST_AVX512 else rows


def _even_width(x: np.ndarray) -> np.ndarray:
    """The micro-kernel reads inputs in pairs: an odd width gets a zero column (its weight is zero too)."""
    if x.shape[1] == 0:
        raise ValueError("gemv needs at least one input")
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x if x.shape[1] % 2 == 0 else np.pad(x, ((0, 0), (0, 1)))


def gemv(x: np.ndarray, weight: TileWeight, pass_tokens: int | None = None) -> np.ndarray:
    """x [R, I] float32 (1 <= R <= MOST_ROWS) @ a bf16 weight [O, I] (its tiles) -> [R, O] float32,
    `pass_tokens` tokens per pass over each weight block (default: `tokens_per_pass`)."""
    rows = x.shape[0]
    if not 1 <= rows <= MOST_ROWS:
        raise ValueError(f"gemv takes 1 to {MOST_ROWS} rows, not {rows}")
    x = _even_width(x)
    out = np.empty((rows, weight.tiles.shape[0] * 16), np.float32)
    _gemv(x, weight.tiles, out, pass_tokens or tokens_per_pass(rows))
    return out if out.shape[1] == weight.outputs else np.ascontiguousarray(out[:, :weight.outputs])


def swiglu(x: np.ndarray, gate_up: TileWeight) -> np.ndarray:
    """silu(x @ gate.T) * (x @ up.T) for a gated weight (`TileWeight.pack_gated`) -> [R, F] float32."""
    rows = x.shape[0]
    if not 1 <= rows <= MOST_ROWS:
        raise ValueError(f"swiglu takes 1 to {MOST_ROWS} rows, not {rows}")
    both = np.empty((rows, gate_up.tiles.shape[0] * 16), np.float32)
    _gemv(_even_width(x), gate_up.tiles, both, tokens_per_pass(rows))
    act = np.empty((rows, gate_up.outputs), np.float32)
    _swiglu(both, act)
    return act
