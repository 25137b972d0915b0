"""Numba CPU kernels: the fast twins of `kernels.reference`, op for op.

Why each op is written the way it is (2 cores, memory-bound at small batch):
- GEMMs of a few tokens (decode; up to SKINNY_MAX_TOKENS) are Numba kernels that stream each
  weight row once (`kernels.few_token_gemm`); larger ones go to BLAS on Numba's thread pool
  (`kernels.cpu_pool`: one pool for the whole step), float32 or, from `bf16_min_tokens` rows, bf16 on our AMX tile or AVX512-BF16
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
from kernels.cpu_pool import gemm_nt
from kernels.few_token_gemm import SKINNY_MAX_TOKENS, few_token_matmul
from kernels.reference import ReferenceKernels, rope_angles

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
