"""Numba CPU kernels: the fast twins of `kernels.reference`, op for op.

Why each op is written the way it is (2 cores, memory-bound at small batch):
- GEMMs of a few tokens (decode; up to SKINNY_MAX_TOKENS) are Numba kernels that stream each
  weight row once (`few_token_matmul`); larger ones go to BLAS on Numba's thread pool (`kernels.cpu_pool`: one pool for
  the whole step), float32 or, from `bf16_min_tokens` rows, bf16 on our AMX tile or AVX512-BF16
  kernel (`kernels.bf16`), where the gate/up GEMM applies SiLU itself (`mlp`).
- The norm, RoPE, SiLU and KV-cache ops are one pass each in Numba, where numpy would allocate
  temporaries and walk the data several times; a layer's RoPE of q and k and its KV write are one
  (`rope_write_kv`).
- Attention reads the paged cache in place through the block table (no gather copy), each K/V row
  once for the G query heads of its group (GQA); long prompts switch to BLAS tiles
  (`kernels.cpu_attention`).
- Every kernel is `nogil` and cached on disk (`kernels.cpu_math.JIT`), and `parallel=True` where
  rows are independent: a launch costs ~2-4 us, and running small inputs on one thread instead
  (numba.set_num_threads around the call) measured 4% slower per decode step.

Shapes follow `kernels.interface` (T tokens, E width, F MLP width, H/Hkv heads, D head dim, N blocks,
P tokens per block).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from kernels import bf16_gemv, cpu_attention, cpu_decode_attention
from kernels.bf16 import Bf16Matmul, tiled_weight
from kernels.cpu_math import JIT, silu_times
from kernels.cpu_memory import keep_freed_memory
from kernels.cpu_pool import MKL_SGEMM, gemm_nt
from kernels.cpu_target import HOST_AVX512
from kernels.reference import ReferenceKernels, rope_angles

# `_skinny_matmul` takes tokens four at a time where its 16 accumulators and 8 operands fit the
# registers (AVX-512 has 32), in pairs otherwise: on AVX2's 16 the four-token tile spills (on a Zen 3
# VM over the model's weights, pairs ran 1.06-1.28x faster at 6-16 tokens and 1.40x at 32)
FOUR_TOKEN_PASSES = HOST_AVX512
# GEMMs with at most this many rows use `_skinny_matmul`, larger ones BLAS: MKL's sgemm overtakes it
# from 32 rows, OpenBLAS's only past 64 (on the AMX Xeon; decode at batch 64 +13% with MKL from 17).
# With pairs of tokens (AVX2), OpenBLAS draws level between 32 and 64 rows (Zen 3 VM, the model's
# GEMMs: the kernel 1.10x OpenBLAS at 32 rows, 1.03-1.05x at 40-48, 0.96x at 64)
SKINNY_MAX_TOKENS = 16 if MKL_SGEMM is not None else 64 if HOST_AVX512 else 32


# ---------------------------------------------------------------- norms
@numba.njit(inline="always", **JIT)
def rms_norm_row(x, t, weight, eps, out):
    """Row t of x [T, E] -> out[t]. Sum of squares in float64: one pass, no cancellation worries."""
    width = x.shape[1]
    acc = 0.0
    for e in range(width):
        acc += np.float64(x[t, e]) * x[t, e]
    inv = np.float32(1.0 / np.sqrt(acc / width + eps))
    for e in range(width):
        out[t, e] = x[t, e] * inv * weight[e]


@numba.njit(inline="always", **JIT)
def add_rms_norm_row(residual, delta, t, weight, eps, summed, out):
    """Row t: summed[t] = residual[t] + delta[t] and out[t] = rms_norm(summed[t]), reading each
    input once (summed may be residual itself)."""
    width = residual.shape[1]
    acc = 0.0
    for e in range(width):
        s = residual[t, e] + delta[t, e]
        summed[t, e] = s
        acc += np.float64(s) * s
    inv = np.float32(1.0 / np.sqrt(acc / width + eps))
    for e in range(width):
        out[t, e] = summed[t, e] * inv * weight[e]


@numba.njit(parallel=True, **JIT)
def _rms_norm(x, weight, eps, out):
    """[T, E] -> out [T, E]."""
    for t in prange(x.shape[0]):
        rms_norm_row(x, t, weight, eps, out)


@numba.njit(parallel=True, **JIT)
def _add_rms_norm(residual, delta, weight, eps, summed, out):
    """[T, E] x2 -> summed = residual + delta and out = rms_norm(summed)."""
    for t in prange(residual.shape[0]):
        add_rms_norm_row(residual, delta, t, weight, eps, summed, out)


# ---------------------------------------------------------------- few-token GEMM
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


# ---------------------------------------------------------------- elementwise
@numba.njit(inline="always", **JIT)
def rotate_into(x, t, h, cos_row, sin_row, out_row):
    """Head h of token t of x [T, H, D] -> out_row [D], rotate_half pairs (j, j + D/2) turned by
    the angles of the token's position (cos_row/sin_row [D/2])."""
    half = out_row.shape[0] // 2
    for j in range(half):
        x1, x2 = x[t, h, j], x[t, h, j + half]
        out_row[j] = x1 * cos_row[j] - x2 * sin_row[j]
        out_row[j + half] = x2 * cos_row[j] + x1 * sin_row[j]


@numba.njit(inline="always", **JIT)
def angles_cover(positions, cos):
    """Whether the angle table has a row for every position (a scan inside the kernel's own call:
    `positions.max()` in Python took 1.4 us of a 7 us RoPE at one token)."""
    for t in range(positions.shape[0]):
        if positions[t] >= cos.shape[0]:
            return False
    return True


@numba.njit(parallel=True, **JIT)
def _rope(x, positions, cos, sin, out):
    """[T, H, D] -> out [T, H, D], by the angle table rows of each token's position (cos/sin
    [positions, D/2]). False, with nothing done, if the table is too short."""
    if not angles_cover(positions, cos):
        return False
    for t in prange(x.shape[0]):
        c, s = cos[positions[t]], sin[positions[t]]
        for h in range(x.shape[1]):
            rotate_into(x, t, h, c, s, out[t, h])
    return True


@numba.njit(parallel=True, **JIT)
def _rope_write_kv(q, k, v, positions, cos, sin, q_out, k_cache, v_cache, slot_mapping):
    """q [T, H, D] -> q_out rotated; k [T, Hkv, D] rotated straight into its cache slots [N, P, Hkv, D],
    v copied beside it (a step's slots are distinct). One pass per token instead of three kernels
    and a rotated-keys array: a layer at 1 token 32 -> 15 us, at 512 tokens 482 -> 392 us. False,
    with nothing done, if the angle table is too short."""
    if not angles_cover(positions, cos):
        return False
    block_tokens = k_cache.shape[1]
    for t in prange(q.shape[0]):
        c, s = cos[positions[t]], sin[positions[t]]
        for h in range(q.shape[1]):
            rotate_into(q, t, h, c, s, q_out[t, h])
        block, row = slot_mapping[t] // block_tokens, slot_mapping[t] % block_tokens
        for h in range(k.shape[1]):
            rotate_into(k, t, h, c, s, k_cache[block, row, h])
            for d in range(v.shape[2]):
                v_cache[block, row, h, d] = v[t, h, d]
    return True


@numba.njit(parallel=True, **JIT)
def _silu_mul(gate_up, out):
    """[T, 2F] -> out [T, F]: silu(gate) * up in one pass (numpy would make four temporaries)."""
    width = out.shape[1]
    for t in prange(gate_up.shape[0]):
        for f in range(width):
            out[t, f] = silu_times(gate_up[t, f], gate_up[t, width + f])


@numba.njit(parallel=True, **JIT)
def _write_kv(k_cache, v_cache, k, v, slot_mapping):
    """Copy [T, Hkv, D] rows into their cache slots (a step's slots are distinct). Element loops:
    k and v are strided views of the qkv product, which row assignment copies through a generic
    path; this way, in parallel, a layer of a 512 / 2,048-token prefill takes 104 / 383 us instead
    of 144 / 784 (a decode step's 1 token: 4 us instead of 2)."""
    block_tokens = k_cache.shape[1]
    for t in prange(k.shape[0]):
        block, row = slot_mapping[t] // block_tokens, slot_mapping[t] % block_tokens
        for h in range(k.shape[1]):
            for d in range(k.shape[2]):
                k_cache[block, row, h, d] = k[t, h, d]
                v_cache[block, row, h, d] = v[t, h, d]


class RopeTable:
    """cos/sin [positions, D/2] per (D, theta), grown by doubling when a kernel finds a position
    past its end: the reference recomputes them in float64 at every call; the table holds exactly
    those float32 values."""

    def __init__(self) -> None:
        self._tables: dict[tuple[int, float], tuple[np.ndarray, np.ndarray]] = {}

    def get(self, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
        key = (head_dim, float(theta))
        if key not in self._tables:
            self._tables[key] = rope_angles(np.arange(4096), head_dim, theta)
        return self._tables[key]

    def grow(self, positions: np.ndarray, head_dim: int, theta: float) -> None:
        """Make room for every one of `positions`."""
        needed = int(positions.max()) + 1
        cos, _ = self.get(head_dim, theta)
        self._tables[(head_dim, float(theta))] = rope_angles(np.arange(max(needed, 2 * len(cos))), head_dim, theta)


# ---------------------------------------------------------------- the backend object
class CpuKernels(ReferenceKernels):
    """Numba + BLAS backend. `bf16`: True demands the bf16 GEMM route (error if unavailable), False
    turns it off, None (default) uses it where the CPU has one (`kernels.bf16`: AMX, or AVX512-BF16).

    With the route on, a step of `bf16_min_tokens` tokens or more runs bf16, its GEMMs and its
    prompts' attention tiles: prefills of 64+ tokens, and decode steps of 64+ sequences (2x
    faster there on AMX, 1.3-1.7x on AVX512-BF16; below, decode stays float32, which keeps every
    golden greedy token, where bf16 decode flips one at token 15, and a cold instance's first short
    prompt does not wait for its weights' bf16 copies to be packed). Outputs then depend on how
    tokens were batched, as bf16 results differ from float32 ones; `bf16=False` keeps every step
    float32.

    `bf16_weights` (off by default; any CPU): steps of up to `bf16_gemv.MOST_ROWS` tokens (decode
    of 1-5 sequences) read the weights' bf16 copies instead of the float32 originals, widened to float32
    in registers (`kernels.bf16_gemv`): half the bytes of a step bound by reading them. Only the
    weights are rounded (as when serving a bf16 checkpoint), but greedy output then drifts from
    the float32 golden sooner, and the copies (half the projections' and the lm_head's bytes) stay
    in memory beside the originals.

    Memory-moving ops (asarray, zeros, embedding, move_blocks) and argmax are numpy's and inherited.
    """

    name = "cpu"

    def __init__(self, bf16: bool | None = None, bf16_min_tokens: int = 64, bf16_weights: bool = False):
        keep_freed_memory()   # a step's intermediates reuse the last step's pages (kernels.cpu_memory)
        self.bf16 = Bf16Matmul.create(required=bool(bf16)) if bf16 is not False else None
        self.bf16_min_tokens = bf16_min_tokens
        self.bf16_weights = bf16_weights
        self.rope_table = RopeTable()

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        out = np.empty_like(x)
        _rms_norm(x, weight, np.float32(eps), out)
        return out

    def add_rms_norm(self, residual: np.ndarray, delta: np.ndarray, weight: np.ndarray,
                     eps: float) -> tuple[np.ndarray, np.ndarray]:
        summed, out = np.empty_like(residual), np.empty_like(residual)
        _add_rms_norm(residual, delta, weight, np.float32(eps), summed, out)
        return summed, out

    def _bf16_for(self, rows: int) -> Bf16Matmul | None:
        """The bf16 route if a step of `rows` tokens takes it."""
        return self.bf16 if rows >= self.bf16_min_tokens else None

    def _reads_bf16_weights(self, rows: int) -> bool:
        return self.bf16_weights and rows <= bf16_gemv.MOST_ROWS

    def linear(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        rows = x.shape[0]
        bf16 = self._bf16_for(rows)
        if bf16 is not None:
            return bf16.matmul(x, weight)
        if self._reads_bf16_weights(rows):
            return bf16_gemv.gemv(x, tiled_weight(weight))
        if rows <= SKINNY_MAX_TOKENS:
            return few_token_matmul(x, weight, gated=False)
        return gemm_nt(x, weight)

    def rope(self, x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
        out = np.empty(x.shape, np.float32)
        while not _rope(x, positions, *self.rope_table.get(x.shape[-1], theta), out):
            self.rope_table.grow(positions, x.shape[-1], theta)
        return out

    def silu_mul(self, gate_up: np.ndarray) -> np.ndarray:
        out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.float32)
        _silu_mul(gate_up, out)
        return out

    def mlp(self, x: np.ndarray, gate_up: np.ndarray, down: np.ndarray) -> np.ndarray:
        """The gate/up GEMM applies SiLU to its own results, so [T, 2F] float32 never reaches
        memory: in the few-token kernel's accumulators, or on the bf16 route in its output blocks,
        written as the down GEMM's bf16 operand (`Bf16Matmul.swiglu`)."""
        rows = x.shape[0]
        bf16 = self._bf16_for(rows)
        if bf16 is not None:
            return bf16.matmul(bf16.swiglu(x, gate_up), down)
        if self._reads_bf16_weights(rows):
            return bf16_gemv.gemv(bf16_gemv.swiglu(x, tiled_weight(gate_up, gated=True)), tiled_weight(down))
        if rows <= SKINNY_MAX_TOKENS:
            return self.linear(few_token_matmul(x, gate_up, gated=True), down)
        return self.linear(self.silu_mul(self.linear(x, gate_up)), down)

    def write_kv(self, k_cache: np.ndarray, v_cache: np.ndarray, k: np.ndarray, v: np.ndarray,
                 slot_mapping: np.ndarray) -> None:
        _write_kv(k_cache, v_cache, k, v, slot_mapping)

    def rope_write_kv(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray, theta: float,
                      k_cache: np.ndarray, v_cache: np.ndarray, slot_mapping: np.ndarray) -> np.ndarray:
        out = np.empty(q.shape, np.float32)
        while not _rope_write_kv(q, k, v, positions, *self.rope_table.get(q.shape[-1], theta), out,
                                 k_cache, v_cache, slot_mapping):
            self.rope_table.grow(positions, q.shape[-1], theta)
        return out

    def prefill_attention(self, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                          block_tables: np.ndarray, query_start: np.ndarray, context_lens: np.ndarray,
                          scale: float) -> np.ndarray:
        return cpu_attention.prefill_attention(q, k_cache, v_cache, block_tables, query_start,
                                               context_lens, scale, self._bf16_for(len(q)))

    def decode_attention(self, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                         block_tables: np.ndarray, context_lens: np.ndarray, scale: float) -> np.ndarray:
        return cpu_decode_attention.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
