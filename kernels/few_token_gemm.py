"""GEMMs of a few tokens on the CPU (decode steps of up to `SKINNY_MAX_TOKENS` sequences): Numba
kernels that stream each float32 weight row once for all the step's tokens.

At decode a GEMM reads its whole weight matrix for a handful of rows of activations, so its speed
is the memory's: the kernels here keep each weight row's products for every token in registers,
and for the gate/up GEMM apply SiLU in them too (`gated`), so [T, 2F] never reaches memory. 1-5
tokens take the GEMV (`_gemv`: one sequential stream of 16 weight rows per work item, which the
hardware prefetcher follows best); more take `_skinny_matmul`, four weight rows at a time. Past
`SKINNY_MAX_TOKENS`, BLAS is faster (`kernels.cpu_pool.gemm_nt`). `gemv_items` is also the GEMV of
the one-region decode step (`kernels.cpu_decode_step`).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from kernels.cpu_math import JIT, silu_times
from kernels.cpu_pool import MKL_SGEMM
from kernels.cpu_target import HOST_AVX512

# `_skinny_matmul` takes tokens four at a time where its 16 accumulators and 8 operands fit the
# registers (AVX-512 has 32), in pairs otherwise: on AVX2's 16 the four-token tile spills (on a Zen 3
# VM over the model's weights, pairs ran 1.06-1.28x faster at 6-16 tokens and 1.40x at 32)
FOUR_TOKEN_PASSES = HOST_AVX512
# GEMMs with at most this many rows use `_skinny_matmul`, larger ones BLAS: MKL's sgemm overtakes it
# from 32 rows, OpenBLAS's only past 64 (on the AMX Xeon; decode at batch 64 +13% with MKL from 17).
# With pairs of tokens (AVX2), OpenBLAS draws level between 32 and 64 rows (Zen 3 VM, the model's
# GEMMs: the kernel 1.10x OpenBLAS at 32 rows, 1.03-1.05x at 40-48, 0.96x at 64)
SKINNY_MAX_TOKENS = 16 if MKL_SGEMM is not None else 64 if HOST_AVX512 else 32



@numba.njit(inline="always", **JIT)
def _store_quad(out, t, o0, o1, o2, o3, a0, a1, a2, a3, gated):
    """Token t's results for the quad's four weight rows: as they are, or, gated, as the two
    SwiGLU outputs of gate rows o0, o1 and up rows o2, o3."""
    if gated:
        out[t, o0], out[t, o1] = silu_times(a0, a2), silu_times(a1, a3)
    else:
        out[t, o0], out[t, o1], out[t, o2], out[t, o3] = a0, a1, a2, a3


@numba.njit(parallel=True, **JIT)
def _skinny_matmul(x, w, out, gated, four_token_passes):
    """out [T, O] = x [T, I] @ w [O, I].T for a few tokens (decode): weight rows stream from memory
    once, four at a time (rows past the end repeat the last one), against register tiles of tokens:
    four at a time if `four_token_passes` (16 accumulators), then pairs (8), then the last one alone.
    BLAS kernels are tuned for large T; up to T = 64 this one reads the weights faster (at T = 8,
    twice as fast as OpenBLAS on an AVX-512 CPU).

    `gated`: w is gate|up [2F, I] and out [T, F] = silu(x @ gate.T) * (x @ up.T), SwiGLU applied
    to the accumulators (a quad is gate rows f, f+1 and up rows F+f, F+f+1): the [T, 2F] product
    never reaches memory."""
    rows, inner = x.shape
    outputs = out.shape[1]
    last = outputs - 1
    quads = (outputs + 1) // 2 if gated else (outputs + 3) // 4
    for quad in prange(quads):
        if gated:
            o0 = 2 * quad
            o1 = min(o0 + 1, last)
            o2, o3 = outputs + o0, outputs + o1
        else:
            o0 = 4 * quad
            o1, o2, o3 = min(o0 + 1, last), min(o0 + 2, last), min(o0 + 3, last)
        t = 0
        while four_token_passes and t + 4 <= rows:
            a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
            a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0.0)
            for i in range(inner):
                w0, w1, w2, w3 = w[o0, i], w[o1, i], w[o2, i], w[o3, i]
                x0, x1, x2, x3 = x[t, i], x[t + 1, i], x[t + 2, i], x[t + 3, i]
                a00, a01, a02, a03 = a00 + x0 * w0, a01 + x0 * w1, a02 + x0 * w2, a03 + x0 * w3
                a10, a11, a12, a13 = a10 + x1 * w0, a11 + x1 * w1, a12 + x1 * w2, a13 + x1 * w3
                a20, a21, a22, a23 = a20 + x2 * w0, a21 + x2 * w1, a22 + x2 * w2, a23 + x2 * w3
                a30, a31, a32, a33 = a30 + x3 * w0, a31 + x3 * w1, a32 + x3 * w2, a33 + x3 * w3
            _store_quad(out, t, o0, o1, o2, o3, a00, a01, a02, a03, gated)
            _store_quad(out, t + 1, o0, o1, o2, o3, a10, a11, a12, a13, gated)
            _store_quad(out, t + 2, o0, o1, o2, o3, a20, a21, a22, a23, gated)
            _store_quad(out, t + 3, o0, o1, o2, o3, a30, a31, a32, a33, gated)
            t += 4
        while t + 2 <= rows:
            a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
            for i in range(inner):
                w0, w1, w2, w3 = w[o0, i], w[o1, i], w[o2, i], w[o3, i]
                x0, x1 = x[t, i], x[t + 1, i]
                a00, a01, a02, a03 = a00 + x0 * w0, a01 + x0 * w1, a02 + x0 * w2, a03 + x0 * w3
                a10, a11, a12, a13 = a10 + x1 * w0, a11 + x1 * w1, a12 + x1 * w2, a13 + x1 * w3
            _store_quad(out, t, o0, o1, o2, o3, a00, a01, a02, a03, gated)
            _store_quad(out, t + 1, o0, o1, o2, o3, a10, a11, a12, a13, gated)
            t += 2
        for r in range(t, rows):
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for i in range(inner):
                xr = x[r, i]
                a0, a1, a2, a3 = a0 + xr * w[o0, i], a1 + xr * w[o1, i], a2 + xr * w[o2, i], a3 + xr * w[o3, i]
            _store_quad(out, r, o0, o1, o2, o3, a0, a1, a2, a3, gated)


# tokens up to which `_gemv` replaces `_skinny_matmul` (which works on four weight rows at a time)
GEMV_MAX_TOKENS = 5


@numba.njit(inline="always", **JIT)
def _dot(x, t, w, o):
    """Token t of x against weight row o (fast-math: LLVM keeps several vector partial sums)."""
    acc = np.float32(0.0)
    for i in range(x.shape[1]):
        acc += x[t, i] * w[o, i]
    return acc


@numba.njit(inline="always", **JIT)
def _put(out, t, o, value, gate_in_out):
    """out[t, o] = value, or, with the gate parked there, silu(gate) * value (value the up output)."""
    out[t, o] = silu_times(out[t, o], value) if gate_in_out else value


@numba.njit(inline="always", **JIT)
def _row_against_tokens(x, w, row, out, o, gate_in_out):
    """Weight row `row` against every token, four tokens per pass over the row (one load of each
    weight for four multiply-adds), the rest one by one (from L1), into column o of out."""
    tokens, t = x.shape[0], 0
    while t + 4 <= tokens:
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for i in range(x.shape[1]):
            wi = w[row, i]
            a0, a1, a2, a3 = a0 + x[t, i] * wi, a1 + x[t + 1, i] * wi, a2 + x[t + 2, i] * wi, a3 + x[t + 3, i] * wi
        _put(out, t, o, a0, gate_in_out)
        _put(out, t + 1, o, a1, gate_in_out)
        _put(out, t + 2, o, a2, gate_in_out)
        _put(out, t + 3, o, a3, gate_in_out)
        t += 4
    for r in range(t, tokens):
        _put(out, r, o, _dot(x, r, w, row), gate_in_out)


@numba.njit(**JIT)
def gemv_items(x, w, out, gated, first_item, end_item):
    """Work items first_item..end_item - 1 of `_gemv`: each reads 16 consecutive weight rows one
    after the other (gated: the 16 gate rows, their gate values parked in `out`, then the 16 up
    rows that pair with them)."""
    outputs = out.shape[1]
    for item in range(first_item, end_item):
        first, end = 16 * item, min(16 * item + 16, outputs)
        for o in range(first, end):
            _row_against_tokens(x, w, o, out, o, False)
        if gated:
            for o in range(first, end):
                _row_against_tokens(x, w, outputs + o, out, o, True)


@numba.njit(inline="always", **JIT)
def gemv_item_count(out):
    return (out.shape[1] + 15) // 16


@numba.njit(parallel=True, **JIT)
def _gemv(x, w, out, gated):
    """`_skinny_matmul` for 1-5 tokens (`gemv_items`): each work item a single sequential stream of
    weight rows. With few tokens to share a weight load, speed is how well the hardware prefetcher
    keeps up, and one stream per thread suits it best. On the AMD EPYC VM, in-process A/Bs over the
    model's GEMV weights: 31-34 GB/s at 1-2 tokens against 25-28 with eight rows interleaved per
    item (1.22-1.31x; eight had beaten four, 1.15-1.20x), and at 4-5 tokens 1.16-1.21x the
    four-row kernel; from 7 tokens that one is faster."""
    for item in prange(gemv_item_count(out)):
        gemv_items(x, w, out, gated, item, item + 1)


def few_token_matmul(x: np.ndarray, w: np.ndarray, gated: bool,
                     four_token_passes: bool = FOUR_TOKEN_PASSES) -> np.ndarray:
    """x @ w.T (gated: SwiGLU of gate|up, see `_skinny_matmul`) for up to SKINNY_MAX_TOKENS rows."""
    out = np.empty((x.shape[0], w.shape[0] // 2 if gated else w.shape[0]), np.float32)
    if x.shape[0] <= GEMV_MAX_TOKENS:
        _gemv(x, w, out, gated)
    else:
        _skinny_matmul(x, w, out, gated, four_token_passes)
    return out
