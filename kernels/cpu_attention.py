"""Paged causal GQA attention on the CPU: a Numba kernel that reads the cache through the block
table, and tiles of GEMMs for prompts (float32 BLAS, or bf16 on AMX or AVX512-BF16).

Decode steps go to `kernels.cpu_decode_attention` and short prefill chunks to `_paged_attention`; both read K
and V straight from their cache blocks (no gather copy), at large batch each row once for all the
query heads that share it (GQA), at small batch with the heads split across the threads instead.
The paged kernel re-reads the whole context per query, so a sequence with TILE_MIN_QUERIES queries and
TILE_MIN_WORK query x key pairs or more goes to tiles instead. Over a 1,024-token context the
float32 tiles are 1.5x faster at 16 queries and 3.7x at 64; on a fresh prompt they break even at 64:
- float32: the context is gathered once and attended in query tiles with two batched GEMMs over the
  KV heads (scores, then weights @ values) around a Numba causal softmax; each tile only multiplies
  the keys its last query can see, which halves the causal work.
- bf16 (`Bf16Matmul` given): flash-style on the route's 32 x 32 block product (`kernels.bf16_gemm`:
  AMX tiles or AVX512-BF16 dot products), `_flash_bf16`: on AMX 2.4-2.9x faster than the float32
  tiles from 128 to 2048 tokens (measured with MKL's bf16 GEMM in its place; the tile version is as
  fast at 128-512 tokens and 5% faster at 2048).

Shapes follow `kernels.interface`; every path matches `kernels.reference.prefill_attention`.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from kernels.bf16 import Bf16Matmul
from kernels.bf16_gemm import add_product_block, begin_blocks, end_blocks, product_block
from kernels.bf16_layout import round_up
from kernels.cpu_math import JIT, LOG2E, bf16_bits, coarse_exp2, fast_exp, row_max
from kernels.cpu_pool import gemm_nt
from kernels.cpu_threads import POOL_THREADS
from kernels.reference import gather_context

TILE_MIN_QUERIES = 16   # a sequence's queries go to tiles from this many queries ...
TILE_MIN_WORK = 4096    # ... and this many query x key pairs (the tile GEMMs' fixed cost); else the paged kernel
QUERY_TILE = 64         # queries per BLAS tile: scores [Hkv, 64 G, L] stay in cache (64: 23% faster than 256 at 2048 tokens)
KEY_BLOCK = 256         # keys per block of the bf16 tiles


@numba.njit(inline="always", **JIT)
def _raise_peak(peak, total, acc, i, block_peak):
    """Online softmax, row i: a new block's scores peak at `block_peak`. If that beats the running
    max, the row's sum and accumulator (kept relative to the max) shrink to the new one. Returns
    the max to take the block's exps against."""
    if block_peak > peak[i]:
        shrink = fast_exp(peak[i] - block_peak)
        total[i] *= shrink
        for d in range(acc.shape[1]):
            acc[i, d] *= shrink
        peak[i] = block_peak
    return peak[i]


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
                    new_peak = _raise_peak(peak, total, acc, h, row_max(weights[h], rows))
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
    heads_per_item = q.shape[1] if len(seqs) >= 4 * POOL_THREADS else 1
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
        peak = row_max(scores[h, r], visible) * scale
        total = np.float32(0.0)
        for t in range(visible):
            w = fast_exp(scores[h, r, t] * scale - peak)
            scores[h, r, t] = w
            total += w
        totals[h, r] = total
        for t in range(visible, length):
            scores[h, r, t] = 0.0


def _attend_tiled(q: np.ndarray, keys: np.ndarray, values: np.ndarray, first: int, scale: float,
                  out: np.ndarray) -> None:
    """One sequence: q [Q, H, D] at positions first .. first + Q - 1 over keys/values [L, Hkv, D]
    (L = first + Q), into out [Q, H, D], in float32 BLAS tiles."""
    num_queries, num_heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    group = num_heads // kv_heads
    k_rows = np.ascontiguousarray(keys.transpose(1, 0, 2))        # [Hkv, L, D]
    v_cols = np.ascontiguousarray(values.transpose(1, 2, 0))      # [Hkv, D, L]: weights @ V as an NT GEMM
    for start in range(0, num_queries, QUERY_TILE):
        stop = min(start + QUERY_TILE, num_queries)
        seen = first + stop                                       # keys the tile's last query sees
        tile = q[start:stop].reshape(stop - start, kv_heads, group, head_dim)
        rows = np.ascontiguousarray(tile.transpose(1, 0, 2, 3)).reshape(kv_heads, -1, head_dim)  # [Hkv, Qt G, D]
        scores = np.empty((kv_heads, rows.shape[1], seen), np.float32)
        totals = np.empty(rows.shape[:2], np.float32)
        mixed = np.empty(rows.shape, np.float32)
        gemm_nt(rows, k_rows[:, :seen], out=scores)
        _causal_exp(scores, first + start, group, np.float32(scale), totals)
        gemm_nt(scores, v_cols[:, :, :seen], out=mixed)
        mixed /= totals[:, :, None]
        out[start:stop] = mixed.reshape(kv_heads, stop - start, group, head_dim).transpose(1, 0, 2, 3) \
                               .reshape(stop - start, num_heads, head_dim)


# ---------------------------------------------------------------- bf16: flash-style tiles
@numba.njit(parallel=True, **JIT)
def _queries_bf16(q, group, out):
    """q [Q, H, D] float32 -> out [Hkv, Q G, D] bf16 (both padded with zeros to 32), grouped by KV
    head: row i G + g of KV head h is query i's head h G + g, so one tile product serves a tile of
    queries and all G heads that share keys. Row-major: the tile loads read it with its stride."""
    for i in prange(q.shape[0]):
        for head in range(q.shape[1]):
            h, g = head // group, head % group
            for d in range(q.shape[2]):
                out[h, i * group + g, d] = bf16_bits(q[i, head, d])


@numba.njit(inline="always", **JIT)
def _bf16_pair(low, high):
    """Two float32 values as one 32-bit word of bf16s, `low` in the low half: one entry of the
    pair format."""
    return np.uint32(bf16_bits(low)) | (np.uint32(bf16_bits(high)) << np.uint32(16))


@numba.njit(parallel=True, **JIT)
def _context_tiles(k_cache, v_cache, block_table, length, keys, values):
    """The first `length` tokens of one sequence's paged caches [N, P, Hkv, D], read through the
    block table, -> per KV head the B tiles (`bf16_layout.TileWeight` pair layout) of
    - keys [Hkv, L / 16, D / 2, 16, 2], the keys as the 16 columns: for scores = queries @ keys.T;
    - values [Hkv, D / 16, L / 2, 16, 2], the head dims as the columns and the keys as the inner
      dimension: for probabilities @ values.
    Written a pair (one 32-bit word) at a time, two tokens per step: a key's dims d, d + 1, a value
    dim's tokens t, t + 1 (2x faster than element by element; D is even, as RoPE needs). An odd
    last token pairs with zeros."""
    key_words = keys.view(np.uint32).reshape(keys.shape[:4])         # [Hkv, L / 16, D / 2, 16]
    value_words = values.view(np.uint32).reshape(values.shape[:4])   # [Hkv, D / 16, L / 2, 16]
    block_tokens, kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    for pair in prange((length + 1) // 2):
        t0 = 2 * pair
        t1 = min(t0 + 1, length - 1)
        b0, r0 = block_table[t0 // block_tokens], t0 % block_tokens
        b1, r1 = block_table[t1 // block_tokens], t1 % block_tokens
        for h in range(kv_heads):
            for e in range(head_dim // 2):
                key_words[h, t0 >> 4, e, t0 & 15] = _bf16_pair(k_cache[b0, r0, h, 2 * e], k_cache[b0, r0, h, 2 * e + 1])
                key_words[h, t1 >> 4, e, t1 & 15] = _bf16_pair(k_cache[b1, r1, h, 2 * e], k_cache[b1, r1, h, 2 * e + 1])
            for d in range(head_dim):
                second = v_cache[b1, r1, h, d] if t1 > t0 else np.float32(0.0)
                value_words[h, d >> 4, pair, d & 15] = _bf16_pair(v_cache[b0, r0, h, d], second)


LAZY_EXPONENT = 60   # bf16 probabilities may reach 2^60 against a stale running max before a rescale
LAZY_LIMIT = np.float32(2.0 ** LAZY_EXPONENT)


@numba.njit(inline="always", **JIT)
def _block_exps(scores, probs, count, scale2, peak2):
    """probs[:count] = bf16(2^(scores scale2 - peak2)), exponents capped at LAZY_EXPONENT; returns
    their sum, which reaches LAZY_LIMIT when the cap was hit (so the caller knows to redo)."""
    row_total = np.float32(0.0)
    for c in range(count):
        w = coarse_exp2(min(scores[c] * scale2 - peak2, np.float32(LAZY_EXPONENT)))
        row_total += w
        probs[c] = bf16_bits(w)
    return row_total


@numba.njit(parallel=True, **JIT)
def _flash_bf16(route, q, keys, values, first, rows, head_dim, group, scale, out):
    """out [Q, H, D] = causal attention of the bf16 query rows q (`_queries_bf16`; `rows` = Q G rows
    per KV head, queries at positions first ..) over the key and value tiles of `_context_tiles`, on
    the route's block product (`kernels.bf16_gemm`).

    A work item is one KV head and one tile of QUERY_TILE queries (Qt G rows). It walks the keys its
    last query sees in blocks of KEY_BLOCK: scores = rows @ keys.T (float32), an online softmax per
    row (running max and sum; the accumulator is rescaled when the max grows), the probabilities
    rounded to bf16, then acc += probabilities @ values. Nothing larger than
    [Qt G, KEY_BLOCK] is written, so it stays in the core's L2; a whole-context score matrix would
    not (the float32 tile path writes [Qt G, L]). The max is rescaled lazily: a block's exps are
    taken against the row's running max in one pass, and only a block whose keys lie 2^LAZY_EXPONENT
    above it takes its own max (a second pass); softmax is the same whichever max the exps are
    relative to. Tiles late in the prompt see more keys: items are ordered light, heavy, light, ...
    so that each thread's contiguous share holds about the same work."""
    kv_heads, padded_dims = q.shape[0], q.shape[2]
    d_tiles = padded_dims // 32
    scale2 = scale * LOG2E   # exps in base 2: coarse_exp2 (rounded to bf16 after) needs no ln 2 split
    tile_rows = QUERY_TILE * group
    tiles = -(-rows // tile_rows)
    block_bytes = d_tiles * 1024   # one 16-key block of key tiles
    q_row_bytes = padded_dims * 2
    value_dim_bytes = values.shape[2] * 64     # one 16-dim block of a head's value tiles
    for item in prange(kv_heads * tiles):
        begin_blocks(route)
        p, h = item // kv_heads, item % kv_heads
        tile = p // 2 if p % 2 == 0 else tiles - 1 - p // 2
        r0 = tile * tile_rows
        count = min(tile_rows, rows - r0)
        pairs = -(-count // 32)
        seen = first + (r0 + count - 1) // group + 1
        scores = np.empty((32 * pairs, KEY_BLOCK), np.float32)
        probs = np.zeros((32 * pairs, KEY_BLOCK), np.uint16)
        acc = np.zeros((32 * pairs, padded_dims), np.float32)
        peak = np.full(count, -np.inf, np.float32)
        total = np.zeros(count, np.float32)
        q_rows = q[h].ctypes.data + r0 * q_row_bytes
        for j0 in range(0, seen, KEY_BLOCK):
            width = min(KEY_BLOCK, seen - j0)
            key_pairs = -(-width // 32)
            for rp in range(pairs):
                a0 = q_rows + 32 * rp * q_row_bytes
                for kp in range(key_pairs):
                    b0 = keys[h].ctypes.data + (j0 // 16 + 2 * kp) * block_bytes
                    product_block(route, a0, a0 + 16 * q_row_bytes, b0, b0 + block_bytes, d_tiles, q_row_bytes, 64,
                                  scores.ctypes.data + (32 * rp * KEY_BLOCK + 32 * kp) * 4, KEY_BLOCK * 4)
            for r in range(count):
                visible = min(first + (r0 + r) // group + 1 - j0, width)
                if visible > 0:
                    if peak[r] == -np.inf:   # the row's first keys (nothing summed yet): exps against their max
                        peak[r] = row_max(scores[r], visible) * scale
                    row_total = _block_exps(scores[r], probs[r], visible, scale2, peak[r] * LOG2E)
                    if row_total >= LAZY_LIMIT:   # a key far above the running max: rescale to it, redo
                        _raise_peak(peak, total, acc, r, row_max(scores[r], visible) * scale)
                        row_total = _block_exps(scores[r], probs[r], visible, scale2, peak[r] * LOG2E)
                    total[r] += row_total
                for c in range(max(visible, 0), 32 * key_pairs):
                    probs[r, c] = 0
            for rp in range(pairs):
                a0 = probs.ctypes.data + 32 * rp * KEY_BLOCK * 2   # row-major, in cache: no tile layout needed
                for dp in range(d_tiles):
                    b0 = values[h].ctypes.data + 2 * dp * value_dim_bytes + (j0 // 32) * 1024
                    c = acc.ctypes.data + (32 * rp * padded_dims + 32 * dp) * 4
                    add_product_block(route, a0, a0 + 16 * KEY_BLOCK * 2, b0, b0 + value_dim_bytes, key_pairs,
                                      KEY_BLOCK * 2, 64, c, padded_dims * 4)
        end_blocks(route)
        for r in range(count):
            i, g = (r0 + r) // group, (r0 + r) % group
            inv = np.float32(1.0) / total[r]
            for d in range(head_dim):
                out[i, h * group + g, d] = acc[r, d] * inv


def _attend_bf16(route: np.ndarray, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_table: np.ndarray,
                 length: int, scale: float, out: np.ndarray) -> None:
    """One sequence's q [Q, H, D] (the last Q of its `length` cached tokens) into out [Q, H, D], on a
    bf16 route: operands converted to bf16 tiles once (zero-padded to whole tiles), then `_flash_bf16`."""
    num_queries, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    rows, dims, keys = num_queries * group, round_up(head_dim, 32), round_up(length, 32)
    q_rows = np.zeros((kv_heads, round_up(rows, 32), dims), np.uint16)
    k_tiles = np.zeros((kv_heads, keys // 16, dims // 2, 16, 2), np.uint16)
    v_tiles = np.zeros((kv_heads, dims // 16, keys // 2, 16, 2), np.uint16)
    _queries_bf16(q, group, q_rows)
    _context_tiles(k_cache, v_cache, block_table, length, k_tiles, v_tiles)
    _flash_bf16(route, q_rows, k_tiles, v_tiles, length - num_queries, rows, head_dim, group, np.float32(scale), out)


def prefill_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_tables: np.ndarray,
                      query_start: np.ndarray, context_lens: np.ndarray, scale: float,
                      bf16: Bf16Matmul | None = None) -> np.ndarray:
    """Twin of `kernels.reference.prefill_attention`: q [T, H, D] packed over B sequences -> [T, H, D].
    `bf16` puts the tiles on its bf16 route."""
    out = np.empty(q.shape, np.float32)
    counts = np.diff(query_start)
    tiled = (counts >= TILE_MIN_QUERIES) & (counts * context_lens.astype(np.int64) >= TILE_MIN_WORK)
    paged = np.flatnonzero(~tiled)
    if len(paged):
        _run_paged(q, k_cache, v_cache, block_tables, query_start, context_lens, paged, scale, out)
    for b in np.flatnonzero(tiled):
        lo, hi, length = int(query_start[b]), int(query_start[b + 1]), int(context_lens[b])
        if bf16 is not None:
            _attend_bf16(bf16.route, q[lo:hi], k_cache, v_cache, block_tables[b], length, scale, out[lo:hi])
        else:
            keys = gather_context(k_cache, block_tables[b], length)
            values = gather_context(v_cache, block_tables[b], length)
            _attend_tiled(q[lo:hi], keys, values, length - (hi - lo), scale, out[lo:hi])
    return out
