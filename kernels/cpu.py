"""Numba CPU kernels: the fast twins of `kernels.reference`, op for op.

Why each op is written the way it is (2 cores, memory-bound at small batch):
- GEMMs go to BLAS (numpy `@`, which releases the GIL), or to the bf16 AMX route of `kernels.amx` for
  steps with many tokens. The norm, RoPE, SiLU and KV-cache ops are one pass each in Numba, where
  numpy would allocate temporaries and walk the data several times.
- Attention reads the paged cache in place through the block table (no gather copy); one K/V row read
  serves the G query heads of its group (GQA). Long prompts switch to BLAS tiles
  (`kernels.cpu_attention`).
- Every kernel is `nogil` (a serving thread runs steps while the asyncio loop and other instances'
  threads keep going), `cache=True` (a restart loads machine code from `__pycache__` instead of
  recompiling), and `parallel=True` where rows are independent: numba's OpenMP launch costs ~2 us,
  so even single-token decode steps take the parallel path.

Shapes follow `kernels.interface` (T tokens, E width, F MLP width, H/Hkv heads, D head dim, N blocks,
P tokens per block).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from kernels import cpu_attention
from kernels.amx import Bf16Matmul
from kernels.reference import ReferenceKernels, rope_angles

# no nnan/ninf: attention and norms must keep IEEE semantics; reassoc lets reductions vectorise
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
JIT = dict(nogil=True, cache=True, fastmath=FASTMATH)


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
            out[t, f] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[t, width + f]


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
        _rms_norm(x, weight, np.float32(eps), out)
        return out

    def add_rms_norm(self, residual: np.ndarray, delta: np.ndarray, weight: np.ndarray,
                     eps: float) -> tuple[np.ndarray, np.ndarray]:
        summed, out = np.empty_like(residual), np.empty_like(residual)
        _add_rms_norm(residual, delta, weight, np.float32(eps), summed, out)
        return summed, out

    def linear(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        if self.bf16 is not None and x.shape[0] >= self.amx_min_tokens:
            return self.bf16.matmul(x, weight)
        return x @ weight.T

    def rope(self, x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
        cos, sin = self._rope_table.get(positions, x.shape[-1], theta)
        out = np.empty(x.shape, np.float32)
        _rope(x, positions, cos, sin, out)
        return out

    def silu_mul(self, gate_up: np.ndarray) -> np.ndarray:
        out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.float32)
        _silu_mul(gate_up, out)
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
