"""Numba CPU kernels: the fast twins of `kernels.reference`, op for op.

Why each op is written the way it is (2 cores, memory-bound at small batch):
- GEMMs of a few tokens (decode) are a Numba kernel that streams each weight row once; larger ones
  go to BLAS on Numba's thread pool (`kernels.cpu_pool`: one pool for the whole step), float32 or,
  for steps with many tokens, bf16 on AMX (`kernels.amx`). The norm, RoPE, SiLU and KV-cache ops are one pass each in Numba, where
  numpy would allocate temporaries and walk the data several times.
- Attention reads the paged cache in place through the block table (no gather copy); one K/V row read
  serves the G query heads of its group (GQA). Long prompts switch to BLAS tiles
  (`kernels.cpu_attention`).
- Every kernel is `nogil` (a serving thread runs steps while the asyncio loop and other instances'
  threads keep going), `cache=True` (a restart loads machine code from `__pycache__` instead of
  recompiling), and `parallel=True` where rows are independent.

Shapes follow `kernels.interface` (T tokens, E width, F MLP width, H/Hkv heads, D head dim, N blocks,
P tokens per block).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from kernels import cpu_attention
from kernels.amx import Bf16Matmul
from kernels.cpu_pool import gemm_nt, run_kernel
from kernels.cpu_math import fast_exp
from kernels.reference import ReferenceKernels, rope_angles

# no nnan/ninf: attention and norms must keep IEEE semantics; reassoc lets reductions vectorise
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
JIT = dict(nogil=True, cache=True, fastmath=FASTMATH)
SKINNY_MAX_TOKENS = 32   # GEMMs with at most this many rows use `_skinny_matmul`, larger ones BLAS


# ---------------------------------------------------------------- norms
@numba.njit(parallel=True, **JIT)
def _rms_norm(x, weight, eps, out):
    """[T, E] -> out [T, E]. Sum of squares in float64: one pass, no cancellation worries."""
    width = x.shape[1]
    for t in prange(x.shape[0]):
        acc = 0.0
        for e in range(width):
            acc += np.float64(x[t, e]) * x[t, e]
        inv = np.float32(1.0 / np.sqrt(acc / width + eps))
        for e in range(width):
            out[t, e] = x[t, e] * inv * weight[e]


@numba.njit(parallel=True, **JIT)
def _add_rms_norm(residual, delta, weight, eps, summed, out):
    """[T, E] x2 -> summed = residual + delta and out = rms_norm(summed), reading each input once."""
    width = residual.shape[1]
    for t in prange(residual.shape[0]):
        acc = 0.0
        for e in range(width):
            s = residual[t, e] + delta[t, e]
            summed[t, e] = s
            acc += np.float64(s) * s
        inv = np.float32(1.0 / np.sqrt(acc / width + eps))
        for e in range(width):
            out[t, e] = summed[t, e] * inv * weight[e]


# ---------------------------------------------------------------- few-token GEMM
@numba.njit(parallel=True, **JIT)
def _skinny_matmul(x, w, out):
    """out [T, O] = x [T, I] @ w [O, I].T for a few tokens (decode): weight rows stream from memory
    once, two at a time, against four tokens at a time, eight accumulators in registers. BLAS
    kernels are tuned for large T; at T <= 32 this reads the weights at up to twice their speed."""
    rows, inner = x.shape
    last = w.shape[0] - 1
    for pair in prange((last + 2) // 2):
        o, p = 2 * pair, min(2 * pair + 1, last)      # an odd last row is computed twice
        t = 0
        while t + 4 <= rows:
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
            for i in range(inner):
                wo, wp = w[o, i], w[p, i]
                x0, x1, x2, x3 = x[t, i], x[t + 1, i], x[t + 2, i], x[t + 3, i]
                a0 += x0 * wo
                a1 += x1 * wo
                a2 += x2 * wo
                a3 += x3 * wo
                b0 += x0 * wp
                b1 += x1 * wp
                b2 += x2 * wp
                b3 += x3 * wp
            out[t, o], out[t + 1, o], out[t + 2, o], out[t + 3, o] = a0, a1, a2, a3
            out[t, p], out[t + 1, p], out[t + 2, p], out[t + 3, p] = b0, b1, b2, b3
            t += 4
        for r in range(t, rows):
            a0 = b0 = np.float32(0.0)
            for i in range(inner):
                a0 += x[r, i] * w[o, i]
                b0 += x[r, i] * w[p, i]
            out[r, o], out[r, p] = a0, b0


# ---------------------------------------------------------------- elementwise
@numba.njit(parallel=True, **JIT)
def _rope(x, positions, cos, sin, out):
    """[T, H, D] -> out [T, H, D], rotate_half pairs (j, j + D/2) by the angle table row of each
    token's position (cos/sin [>max position, D/2])."""
    num_heads, half = x.shape[1], x.shape[2] // 2
    for t in prange(x.shape[0]):
        p = positions[t]
        for h in range(num_heads):
            for j in range(half):
                x1, x2 = x[t, h, j], x[t, h, j + half]
                out[t, h, j] = x1 * cos[p, j] - x2 * sin[p, j]
                out[t, h, j + half] = x2 * cos[p, j] + x1 * sin[p, j]


@numba.njit(parallel=True, **JIT)
def _silu_mul(gate_up, out):
    """[T, 2F] -> out [T, F]: silu(gate) * up in one pass (numpy would make four temporaries)."""
    width = out.shape[1]
    for t in prange(gate_up.shape[0]):
        for f in range(width):
            g = gate_up[t, f]
            out[t, f] = g / (np.float32(1.0) + fast_exp(-g)) * gate_up[t, width + f]


@numba.njit(**JIT)
def _write_kv(k_cache, v_cache, k, v, slot_mapping):
    """Copy [T, Hkv, D] rows into their cache slots; serial: T rows of a few hundred bytes."""
    block_tokens = k_cache.shape[1]
    for t in range(k.shape[0]):
        block, row = divmod(slot_mapping[t], block_tokens)
        k_cache[block, row] = k[t]
        v_cache[block, row] = v[t]


class _RopeTable:
    """cos/sin [positions, D/2] per (D, theta), grown by doubling: the reference recomputes them in
    float64 at every call; the table holds exactly those float32 values."""

    def __init__(self) -> None:
        self._tables: dict[tuple[int, float], tuple[np.ndarray, np.ndarray]] = {}

    def get(self, positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
        key = (head_dim, float(theta))
        cos, sin = self._tables.get(key, (np.empty((0, head_dim // 2), np.float32),) * 2)
        needed = int(positions.max()) + 1 if len(positions) else 0
        if needed > len(cos):
            cos, sin = rope_angles(np.arange(max(needed, 2 * len(cos), 4096)), head_dim, theta)
            self._tables[key] = (cos, sin)
        return cos, sin


# ---------------------------------------------------------------- the backend object
class CpuKernels(ReferenceKernels):
    """Numba + BLAS backend. `amx`: True demands the bf16 AMX GEMM route (error if unavailable),
    False turns it off, None (default) uses it when the CPU and MKL allow. GEMMs with fewer than
    `amx_min_tokens` rows (decode steps, small prefills) stay float32.

    Memory-moving ops (asarray, zeros, embedding, move_blocks) and argmax are numpy's and inherited.
    """

    name = "cpu"

    def __init__(self, amx: bool | None = None, amx_min_tokens: int = 64):
        self.bf16 = Bf16Matmul.create(required=bool(amx)) if amx is not False else None
        self.amx_min_tokens = amx_min_tokens
        self._rope_table = _RopeTable()

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        out = np.empty_like(x)
        run_kernel(_rms_norm, x.size, x, weight, np.float32(eps), out)
        return out

    def add_rms_norm(self, residual: np.ndarray, delta: np.ndarray, weight: np.ndarray,
                     eps: float) -> tuple[np.ndarray, np.ndarray]:
        summed, out = np.empty_like(residual), np.empty_like(residual)
        run_kernel(_add_rms_norm, residual.size, residual, delta, weight, np.float32(eps), summed, out)
        return summed, out

    def linear(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        rows = x.shape[0]
        if self.bf16 is not None and rows >= self.amx_min_tokens:
            return self.bf16.matmul(x, weight)
        if rows <= SKINNY_MAX_TOKENS:
            out = np.empty((rows, weight.shape[0]), np.float32)
            run_kernel(_skinny_matmul, weight.size, x, weight, out)
            return out
        return gemm_nt(x, weight)

    def rope(self, x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
        cos, sin = self._rope_table.get(positions, x.shape[-1], theta)
        out = np.empty(x.shape, np.float32)
        run_kernel(_rope, x.size, x, positions, cos, sin, out)
        return out

    def silu_mul(self, gate_up: np.ndarray) -> np.ndarray:
        out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.float32)
        run_kernel(_silu_mul, gate_up.size, gate_up, out)
        return out

    def write_kv(self, k_cache: np.ndarray, v_cache: np.ndarray, k: np.ndarray, v: np.ndarray,
                 slot_mapping: np.ndarray) -> None:
        _write_kv(k_cache, v_cache, k, v, slot_mapping)

    def prefill_attention(self, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                          block_tables: np.ndarray, query_start: np.ndarray, context_lens: np.ndarray,
                          scale: float) -> np.ndarray:
        return cpu_attention.prefill_attention(q, k_cache, v_cache, block_tables, query_start,
                                               context_lens, scale)

    def decode_attention(self, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                         block_tables: np.ndarray, context_lens: np.ndarray, scale: float) -> np.ndarray:
        return cpu_attention.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
