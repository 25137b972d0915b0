"""Decode attention on the CPU: one query per sequence over its paged cache (the twin of
`kernels.reference.decode_attention`), in three vectorised passes per work item, with the keys split
between the threads when there are few sequences and the parts merged after.

Shapes follow `kernels.interface`.
"""
from __future__ import annotations

import functools

import numba
import numpy as np
from numba import prange

from kernels.cpu_math import JIT, fast_exp, row_max
from kernels.cpu_threads import POOL_THREADS


@numba.njit(inline="always", **JIT)
def work_split(num_seqs, kv_heads, threads):
    """(key splits per sequence, KV heads per work item), and so the number of work items. Fewer
    sequences than twice the threads split their keys among them, all heads in each item, so each
    cached row is read whole (batch 1 over 1,024 keys: 91 us against 118 for an item per KV head,
    in-process A/B after a GEMV evicted the cache; batch 2: 185 against 236); up to 4 per thread
    give each KV head an item of its own; more make one item per sequence. `threads` is the pool's
    size (`cpu_threads.POOL_THREADS`), not the count the step runs on: splits change the order of
    the sums."""
    few, many = num_seqs < 2 * threads, num_seqs >= 4 * threads
    return (threads if few else 1), (kv_heads if few or many else 1)


@numba.njit(inline="always", **JIT)
def attend_item(item, q, k_cache, v_cache, block_tables, context_lens, kv_per_item, splits, scale, peaks, totals,
                partial, head_dim, group, block_tokens):
    """Work item `item` of the attention of each q[b] [H, D] over the context_lens[b] cached keys
    of sequence b, in parts: split s of the keys leaves its max, its sum of exps and its
    unnormalised output in peaks / totals [B, H, S] and partial [B, H, S, D], which `merge_splits`
    combines.

    A work item is one sequence, `kv_per_item` of its KV heads with their G query heads each, and
    one of `splits` runs of its key blocks. It takes three passes over its keys instead of an online
    softmax, each a plain loop LLVM vectorises along D: every score into a scratch row (each K row
    read once for its G heads), then each row's max, exps and sum, then probabilities @ V. At batch
    1 over 1,024 keys that is 2x faster than one pass that rescales as it goes (`_paged_attention`).

    head_dim D, group G and block_tokens P are compile-time constants where it is inlined (the
    ints of the callers' closures): LLVM then unrolls the loops over D and the heads that run once
    per key; with shapes read at run time every key paid their loop set-up (decode attention per
    call, alternating A/Bs: batch 1 over 1,024 keys 1.2x, batch 32 over 128 and 1,024 keys
    1.2-1.4x).
    """
    items_per_seq = k_cache.shape[2] // kv_per_item
    split = item % splits
    b = item // (items_per_seq * splits)
    kv0 = ((item // splits) % items_per_seq) * kv_per_item
    h0, heads = kv0 * group, kv_per_item * group
    length = context_lens[b]
    blocks = -(-length // block_tokens)
    per_split = -(-blocks // splits)
    j0, j1 = split * per_split, min(blocks, (split + 1) * per_split)
    key0 = j0 * block_tokens
    count = max(min(length, j1 * block_tokens) - key0, 0)
    q_scaled = np.empty((heads, head_dim), np.float32)
    for h in range(heads):
        for d in range(head_dim):
            q_scaled[h, d] = q[b, h0 + h, d] * scale
    probs = np.empty((heads, max(count, 1)), np.float32)
    for j in range(j0, j1):
        block, first = block_tables[b, j], j * block_tokens
        for row in range(min(block_tokens, length - first)):
            for h in range(heads):
                kh = kv0 + h // group
                acc = np.float32(0.0)
                for d in range(head_dim):
                    acc += q_scaled[h, d] * k_cache[block, row, kh, d]
                probs[h, first - key0 + row] = acc
    for h in range(heads):
        if count == 0:   # a split past the end of a short context
            peaks[b, h0 + h, split] = -np.inf
            totals[b, h0 + h, split] = 0.0
            continue
        peak = row_max(probs[h], count)
        total = np.float32(0.0)
        for key in range(count):
            e = fast_exp(probs[h, key] - peak)
            probs[h, key] = e
            total += e
        peaks[b, h0 + h, split] = peak
        totals[b, h0 + h, split] = total
    acc_out = np.zeros((heads, head_dim), np.float32)
    for j in range(j0, j1):
        block, first = block_tables[b, j], j * block_tokens
        for row in range(min(block_tokens, length - first)):
            for h in range(heads):
                kh = kv0 + h // group
                p = probs[h, first - key0 + row]
                for d in range(head_dim):
                    acc_out[h, d] += p * v_cache[block, row, kh, d]
    for h in range(heads):
        for d in range(head_dim):
            partial[b, h0 + h, split, d] = acc_out[h, d]


@functools.cache
def _attention(head_dim: int, group: int, block_tokens: int):
    """The op compiled for one model's head dim, GQA group and block size (`attend_item`'s
    constants: the closure's ints, which Numba folds in). The closure holds ints only and calls the
    module's functions as globals: a closure over another compiled function gets a new cache key
    in every process (the function pickles with a per-process id), so it would be compiled afresh
    each time."""

    @numba.njit(parallel=True, **JIT)
    def attention(q, k_cache, v_cache, block_tables, context_lens, scale, threads):
        """The whole op in one compiled call (its set-up in Python cost ~4 us of a 16 us layer at
        batch 1): the work items in parallel, then the merge. `threads` is what the work is divided
        by (`work_split`), an argument because a kernel that asks for it is not cached."""
        num_seqs, num_heads = q.shape[0], q.shape[1]
        splits, kv_per_item = work_split(num_seqs, k_cache.shape[2], threads)
        peaks = np.empty((num_seqs, num_heads, splits), np.float32)
        totals = np.empty_like(peaks)
        partial = np.empty((num_seqs, num_heads, splits, head_dim), np.float32)
        for item in prange(num_seqs * (k_cache.shape[2] // kv_per_item) * splits):
            attend_item(item, q, k_cache, v_cache, block_tables, context_lens, kv_per_item, splits, scale, peaks,
                        totals, partial, head_dim, group, block_tokens)
        out = np.empty((num_seqs, num_heads, head_dim), np.float32)
        merge_splits(peaks, totals, partial, out)
        return out

    return attention


@numba.njit(**JIT)
def merge_splits(peaks, totals, partial, out):
    """out[b, h] = the splits' outputs combined, each scaled by exp(its max - the largest max), as
    their sums are (a split without keys has sum 0 and adds nothing). Serial: B H D values."""
    for b in range(peaks.shape[0]):
        for h in range(peaks.shape[1]):
            peak = peaks[b, h, 0]
            for split in range(1, peaks.shape[2]):
                peak = max(peak, peaks[b, h, split])
            total = np.float32(0.0)
            for d in range(out.shape[2]):
                out[b, h, d] = 0.0
            for split in range(peaks.shape[2]):
                factor = fast_exp(peaks[b, h, split] - peak) if totals[b, h, split] > 0 else np.float32(0.0)
                total += factor * totals[b, h, split]
                for d in range(out.shape[2]):
                    out[b, h, d] += factor * partial[b, h, split, d]
            inv = np.float32(1.0) / total
            for d in range(out.shape[2]):
                out[b, h, d] *= inv


def decode_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_tables: np.ndarray,
                     context_lens: np.ndarray, scale: float) -> np.ndarray:
    """Twin of `kernels.reference.decode_attention`: q [B, H, D], one query per sequence (see
    `_attention`)."""
    attention = _attention(q.shape[2], q.shape[1] // k_cache.shape[2], k_cache.shape[1])
    return attention(q, k_cache, v_cache, block_tables, context_lens, np.float32(scale), POOL_THREADS)
