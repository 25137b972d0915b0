"""Paged causal GQA attention on the CPU: a Numba kernel that reads the cache through the block
table, and BLAS tiles for long prompts.

Decode steps and short prefill chunks go to `_paged_attention`: one work item per (sequence, KV
head), so a K or V row is loaded once for the G query heads that share it, straight from its cache
block (no gather copy). A prompt with many queries would make that kernel re-read the whole context
per query at scalar-loop speed, so from `BLAS_MIN_QUERIES` queries on a sequence is gathered once and
attended in query tiles with two batched GEMMs (scores, then weights @ values) around a Numba causal
softmax; each tile only multiplies the keys its last query can see, which halves the causal work.

Shapes follow `kernels.interface`; both paths match `kernels.reference.prefill_attention`.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from kernels.reference import gather_context

FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
JIT = dict(nogil=True, cache=True, fastmath=FASTMATH)
BLAS_MIN_QUERIES = 64   # below this, a sequence's queries go through the paged kernel
QUERY_TILE = 256        # queries per BLAS tile: scores [Hkv, 256 G, L] stay a few MB


@numba.njit(parallel=True, **JIT)
def _paged_attention(q, k_cache, v_cache, block_tables, query_start, context_lens, seqs, scale, out):
    """out[i] = causal attention of q[i] [H, D] over its sequence's cached keys, for the sequences
    listed in `seqs`. Sequence b's queries q[query_start[b]:query_start[b+1]] are the last tokens
    of its context_lens[b] cached ones."""
    kv_heads, block_tokens = k_cache.shape[2], k_cache.shape[1]
    group, head_dim = q.shape[1] // kv_heads, q.shape[2]
    for item in prange(seqs.shape[0] * kv_heads):
        b = seqs[item // kv_heads]
        kh = item % kv_heads
        lo, hi = query_start[b], query_start[b + 1]
        first = context_lens[b] - (hi - lo)
        scores = np.empty((group, context_lens[b]), np.float32)
        acc = np.empty((group, head_dim), np.float32)
        total = np.empty(group, np.float32)
        for i in range(lo, hi):
            visible = first + (i - lo) + 1
            for t in range(visible):
                block, row = block_tables[b, t // block_tokens], t % block_tokens
                for g in range(group):
                    s = np.float32(0.0)
                    for d in range(head_dim):
                        s += q[i, kh * group + g, d] * k_cache[block, row, kh, d]
                    scores[g, t] = s * scale
            for g in range(group):
                peak = scores[g, 0]
                for t in range(1, visible):
                    peak = max(peak, scores[g, t])
                total[g] = 0.0
                for t in range(visible):
                    w = np.exp(scores[g, t] - peak)
                    scores[g, t] = w
                    total[g] += w
            acc[:] = 0.0
            for t in range(visible):
                block, row = block_tables[b, t // block_tokens], t % block_tokens
                for g in range(group):
                    w = scores[g, t]
                    for d in range(head_dim):
                        acc[g, d] += w * v_cache[block, row, kh, d]
            for g in range(group):
                for d in range(head_dim):
                    out[i, kh * group + g, d] = acc[g, d] / total[g]


@numba.njit(parallel=True, **JIT)
def _causal_softmax(scores, first, group, scale):
    """In place over scores [Hkv, R, L]: row r belongs to query r // G at position first + r // G,
    which sees keys 0 .. first + r // G; the rest of the row becomes 0."""
    rows, length = scores.shape[1], scores.shape[2]
    for item in prange(scores.shape[0] * rows):
        h, r = item // rows, item % rows
        visible = min(first + r // group + 1, length)
        peak = scores[h, r, 0] * scale
        for t in range(1, visible):
            peak = max(peak, scores[h, r, t] * scale)
        total = np.float32(0.0)
        for t in range(visible):
            w = np.exp(scores[h, r, t] * scale - peak)
            scores[h, r, t] = w
            total += w
        for t in range(visible):
            scores[h, r, t] /= total
        for t in range(visible, length):
            scores[h, r, t] = 0.0


def _attend_tiled(q: np.ndarray, keys: np.ndarray, values: np.ndarray, first: int, scale: float,
                  out: np.ndarray) -> None:
    """One sequence: q [Q, H, D] at positions first .. first + Q - 1 over keys/values [L, Hkv, D]
    (L = first + Q), into out [Q, H, D]."""
    num_queries, num_heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    group = num_heads // kv_heads
    k_heads = np.ascontiguousarray(keys.transpose(1, 0, 2))       # [Hkv, L, D]
    v_heads = np.ascontiguousarray(values.transpose(1, 0, 2))     # [Hkv, L, D]
    for start in range(0, num_queries, QUERY_TILE):
        stop = min(start + QUERY_TILE, num_queries)
        seen = first + stop                                       # keys the tile's last query sees
        tile = q[start:stop].reshape(stop - start, kv_heads, group, head_dim)
        rows = tile.transpose(1, 0, 2, 3).reshape(kv_heads, (stop - start) * group, head_dim)
        scores = np.matmul(rows, k_heads[:, :seen].transpose(0, 2, 1))   # [Hkv, Qt G, seen]
        _causal_softmax(scores, first + start, group, np.float32(scale))
        mixed = np.matmul(scores, v_heads[:, :seen])                      # [Hkv, Qt G, D]
        out[start:stop] = mixed.reshape(kv_heads, stop - start, group, head_dim).transpose(1, 0, 2, 3) \
                               .reshape(stop - start, num_heads, head_dim)


def prefill_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_tables: np.ndarray,
                      query_start: np.ndarray, context_lens: np.ndarray, scale: float) -> np.ndarray:
    """Twin of `kernels.reference.prefill_attention`: q [T, H, D] packed over B sequences -> [T, H, D]."""
    out = np.empty(q.shape, np.float32)
    counts = np.diff(query_start)
    long = counts >= BLAS_MIN_QUERIES
    short = np.flatnonzero(~long)
    if len(short):
        _paged_attention(q, k_cache, v_cache, block_tables, query_start, context_lens, short,
                         np.float32(scale), out)
    for b in np.flatnonzero(long):
        lo, hi, length = int(query_start[b]), int(query_start[b + 1]), int(context_lens[b])
        keys = gather_context(k_cache, block_tables[b], length)
        values = gather_context(v_cache, block_tables[b], length)
        _attend_tiled(q[lo:hi], keys, values, length - (hi - lo), scale, out[lo:hi])
    return out


def decode_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_tables: np.ndarray,
                     context_lens: np.ndarray, scale: float) -> np.ndarray:
    """Twin of `kernels.reference.decode_attention`: q [B, H, D], one query per sequence."""
    out = np.empty(q.shape, np.float32)
    num_seqs = len(context_lens)
    query_start = np.arange(num_seqs + 1, dtype=np.int32)
    _paged_attention(q, k_cache, v_cache, block_tables, query_start, context_lens,
                     np.arange(num_seqs), np.float32(scale), out)
    return out
