"""Paged causal GQA attention on the CPU: a Numba kernel that reads the cache through the block
table, and BLAS tiles for long prompts.

Decode steps and short prefill chunks go to `_paged_attention`, which reads K and V straight from
their cache blocks (no gather copy); at large batch each row once for all the query heads that share
it (GQA), at small batch with the heads split across the threads instead. A prompt with many queries would make that kernel re-read the whole context
per query at scalar-loop speed, so from `BLAS_MIN_QUERIES` queries on a sequence is gathered once and
attended in query tiles with two batched GEMMs over the KV heads (scores, then weights @ values) around a Numba causal
softmax; each tile only multiplies the keys its last query can see, which halves the causal work.

Shapes follow `kernels.interface`; both paths match `kernels.reference.prefill_attention`.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from kernels.amx import Bf16Matmul, to_bf16
from kernels.cpu_math import JIT, fast_exp
from kernels.cpu_pool import gemm_nt
from kernels.reference import gather_context

BLAS_MIN_QUERIES = 128  # below this, a sequence's queries go through the paged kernel
BF16_MIN_QUERIES = 512  # from here the tiles' GEMMs may run bf16: below, the conversions cost more
QUERY_TILE = 64         # queries per BLAS tile: scores [Hkv, 64 G, L] stay in cache (64: 23% faster than 256 at 2048 tokens)


@numba.njit(parallel=True, **JIT)
def _paged_attention(q, k_cache, v_cache, block_tables, query_start, context_lens, seqs, heads_per_item,
                     scale, out):
    """out[i] = causal attention of q[i] [H, D] over its sequence's cached keys, for the sequences
    listed in `seqs`. Sequence b's queries q[query_start[b]:query_start[b+1]] are the last tokens
    of its context_lens[b] cached ones.

    One pass over the context per query, block by block, with an online softmax (running max and
    sum, rescaling the accumulator when the max grows): K and V of a block are read together, once.
    A work item is one sequence and `heads_per_item` query heads: all H when there are enough
    sequences to keep the threads busy, so each block is read as one contiguous run; a single head
    when there are few, so that 2 threads split 9 heads 5:4 rather than 3 groups 2:1.
    """
    kv_heads, block_tokens = k_cache.shape[2], k_cache.shape[1]
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // kv_heads
    items_per_seq = num_heads // heads_per_item
    for item in prange(seqs.shape[0] * items_per_seq):
        b = seqs[item // items_per_seq]
        h0 = (item % items_per_seq) * heads_per_item
        lo, hi = query_start[b], query_start[b + 1]
        first = context_lens[b] - (hi - lo)
        q_scaled = np.empty((heads_per_item, head_dim), np.float32)
        acc = np.empty((heads_per_item, head_dim), np.float32)
        weights = np.empty((heads_per_item, block_tokens), np.float32)
        peak = np.empty(heads_per_item, np.float32)
        total = np.empty(heads_per_item, np.float32)
        for i in range(lo, hi):
            visible = first + (i - lo) + 1
            for h in range(heads_per_item):
                for d in range(head_dim):
                    q_scaled[h, d] = q[i, h0 + h, d] * scale
            acc[:] = 0.0
            peak[:] = -np.inf
            total[:] = 0.0
            for j in range(-(-visible // block_tokens)):
                block = block_tables[b, j]
                rows = min(block_tokens, visible - j * block_tokens)
                for r in range(rows):
                    for h in range(heads_per_item):
                        kh = (h0 + h) // group
                        s = np.float32(0.0)
                        for d in range(head_dim):
                            s += q_scaled[h, d] * k_cache[block, r, kh, d]
                        weights[h, r] = s
                for h in range(heads_per_item):
                    new_peak = peak[h]
                    for r in range(rows):
                        new_peak = max(new_peak, weights[h, r])
                    if new_peak > peak[h]:
                        shrink = fast_exp(peak[h] - new_peak)
                        total[h] *= shrink
                        for d in range(head_dim):
                            acc[h, d] *= shrink
                        peak[h] = new_peak
                    for r in range(rows):
                        w = fast_exp(weights[h, r] - new_peak)
                        weights[h, r] = w
                        total[h] += w
                for r in range(rows):
                    for h in range(heads_per_item):
                        kh = (h0 + h) // group
                        w = weights[h, r]
                        for d in range(head_dim):
                            acc[h, d] += w * v_cache[block, r, kh, d]
            for h in range(heads_per_item):
                inv = np.float32(1.0) / total[h]
                for d in range(head_dim):
                    out[i, h0 + h, d] = acc[h, d] * inv


def _run_paged(q, k_cache, v_cache, block_tables, query_start, context_lens, seqs, scale, out) -> None:
    """`_paged_attention` with work items sized to the thread count (see its docstring)."""
    heads_per_item = q.shape[1] if len(seqs) >= 4 * numba.get_num_threads() else 1
    _paged_attention(q, k_cache, v_cache, block_tables, query_start, context_lens, seqs, heads_per_item,
                     np.float32(scale), out)


@numba.njit(parallel=True, **JIT)
def _causal_exp(scores, first, group, scale, totals):
    """In place over scores [Hkv, R, L]: row r belongs to query r // G at position first + r // G,
    which sees keys 0 .. first + r // G. Visible entries become exp(scale * score - row max), the
    rest 0, and totals [Hkv, R] get the row sums: the softmax without its division, which is done
    on the [R, D] output of the next GEMM instead of the [R, L] weights."""
    rows, length = scores.shape[1], scores.shape[2]
    for item in prange(scores.shape[0] * rows):
        h, r = item // rows, item % rows
        visible = min(first + r // group + 1, length)
        peak = scores[h, r, 0]
        for t in range(1, visible):
            peak = max(peak, scores[h, r, t])
        peak *= scale
        total = np.float32(0.0)
        for t in range(visible):
            w = fast_exp(scores[h, r, t] * scale - peak)
            scores[h, r, t] = w
            total += w
        totals[h, r] = total
        for t in range(visible, length):
            scores[h, r, t] = 0.0


def _attend_tiled(q: np.ndarray, keys: np.ndarray, values: np.ndarray, first: int, scale: float,
                  out: np.ndarray, bf16: Bf16Matmul | None) -> None:
    """One sequence: q [Q, H, D] at positions first .. first + Q - 1 over keys/values [L, Hkv, D]
    (L = first + Q), into out [Q, H, D]. With `bf16`, both GEMMs take bf16 operands (float32
    accumulation); the softmax stays float32."""
    num_queries, num_heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    group = num_heads // kv_heads
    operand, gemm = (to_bf16, bf16.gemm) if bf16 else (np.ascontiguousarray, None)
    k_rows = operand(keys.transpose(1, 0, 2))                     # [Hkv, L, D]
    v_cols = operand(values.transpose(1, 2, 0))                   # [Hkv, D, L]: weights @ V as an NT GEMM
    for start in range(0, num_queries, QUERY_TILE):
        stop = min(start + QUERY_TILE, num_queries)
        seen = first + stop                                       # keys the tile's last query sees
        tile = q[start:stop].reshape(stop - start, kv_heads, group, head_dim)
        rows = np.ascontiguousarray(tile.transpose(1, 0, 2, 3)).reshape(kv_heads, -1, head_dim)  # [Hkv, Qt G, D]
        scores = np.empty((kv_heads, rows.shape[1], seen), np.float32)
        totals = np.empty(rows.shape[:2], np.float32)
        mixed = np.empty(rows.shape, np.float32)
        rows = operand(rows)
        gemm_nt(rows, k_rows[:, :seen], gemm=gemm, out=scores)
        _causal_exp(scores, first + start, group, np.float32(scale), totals)
        weights = operand(scores)
        gemm_nt(weights, v_cols[:, :, :seen], gemm=gemm, out=mixed)
        mixed /= totals[:, :, None]
        out[start:stop] = mixed.reshape(kv_heads, stop - start, group, head_dim).transpose(1, 0, 2, 3) \
                               .reshape(stop - start, num_heads, head_dim)


def prefill_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_tables: np.ndarray,
                      query_start: np.ndarray, context_lens: np.ndarray, scale: float,
                      bf16: Bf16Matmul | None = None) -> np.ndarray:
    """Twin of `kernels.reference.prefill_attention`: q [T, H, D] packed over B sequences -> [T, H, D].
    `bf16` puts the GEMMs of prompts of BF16_MIN_QUERIES or more queries on the AMX route."""
    out = np.empty(q.shape, np.float32)
    counts = np.diff(query_start)
    long = counts >= BLAS_MIN_QUERIES
    short = np.flatnonzero(~long)
    if len(short):
        _run_paged(q, k_cache, v_cache, block_tables, query_start, context_lens, short, scale, out)
    for b in np.flatnonzero(long):
        lo, hi, length = int(query_start[b]), int(query_start[b + 1]), int(context_lens[b])
        keys = gather_context(k_cache, block_tables[b], length)
        values = gather_context(v_cache, block_tables[b], length)
        tile_bf16 = bf16 if hi - lo >= BF16_MIN_QUERIES else None
        _attend_tiled(q[lo:hi], keys, values, length - (hi - lo), scale, out[lo:hi], tile_bf16)
    return out


def decode_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_tables: np.ndarray,
                     context_lens: np.ndarray, scale: float) -> np.ndarray:
    """Twin of `kernels.reference.decode_attention`: q [B, H, D], one query per sequence."""
    out = np.empty(q.shape, np.float32)
    num_seqs = len(context_lens)
    query_start = np.arange(num_seqs + 1, dtype=np.int32)
    _run_paged(q, k_cache, v_cache, block_tables, query_start, context_lens, np.arange(num_seqs), scale, out)
    return out
