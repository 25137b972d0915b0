"""Numpy reference kernels: the ground truth every other backend is tested against.

Written for clarity, vectorised where that stays readable. Attention loops over sequences (each has
its own length and block table) and is vectorised over heads and tokens inside a sequence. Softmax
and norms accumulate in float32 with the max subtracted, as the fast kernels must.

Shapes follow `kernels.interface` (T tokens, B sequences, E width, H/Hkv heads, D head dim, N blocks,
P tokens per block).
"""
from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kernels.interface import Array


# ---------------------------------------------------------------- elementwise and matmul ops
def embedding(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """[V, E], [T] -> [T, E]: one row of the table per token."""
    return table[ids]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """[T, E] -> [T, E]: x / sqrt(mean(x^2) + eps) * weight (Llama's RMSNorm, no mean subtraction)."""
    variance = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
    return (x / np.sqrt(variance + np.float32(eps))) * weight


def add_rms_norm(residual: np.ndarray, delta: np.ndarray, weight: np.ndarray,
                 eps: float) -> tuple[np.ndarray, np.ndarray]:
    """[T, E] x2 -> (residual + delta, rms_norm(residual + delta)): the residual add fused with the
    next norm, since fast backends save a full read and write of the residual stream this way."""
    summed = residual + delta
    return summed, rms_norm(summed, weight, eps)


def linear(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """[T, I], [O, I] -> [T, O]: x @ weight.T (weights keep the HF [out, in] layout)."""
    return x @ weight.T


def rope_angles(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """[T] -> cos, sin [T, D/2]. inv_freq[j] = theta^(-2j/D); computed in float64 so that long
    positions keep their precision, then rounded to float32."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """[T, H, D] -> [T, H, D]: rotary embedding in HF's rotate_half form, i.e. dims (j, j + D/2)
    of each head rotate together by angle position * inv_freq[j]."""
    half = x.shape[-1] // 2
    cos, sin = rope_angles(positions, x.shape[-1], theta)
    cos, sin = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    """[T, 2F] -> [T, F]: silu(gate) * up, with gate and up stored side by side (one GEMM makes both)."""
    gate, up = np.split(gate_up, 2, axis=-1)
    return gate / (np.float32(1.0) + np.exp(-gate)) * up


def mlp(x: np.ndarray, gate_up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """[T, E] -> [T, E]: the SwiGLU MLP, linear(silu_mul(linear(x, gate_up)), down). One op so that
    a backend may fuse across it (the CPU's AMX route has SiLU write the down GEMM's bf16 operand)."""
    return linear(silu_mul(linear(x, gate_up)), down)


# ---------------------------------------------------------------- paged KV cache
def write_kv(k_cache: np.ndarray, v_cache: np.ndarray, k: np.ndarray, v: np.ndarray,
             slot_mapping: np.ndarray) -> None:
    """Store each token's key and value [T, Hkv, D] at its cache slot (in place, caches [N, P, Hkv, D])."""
    block_tokens = k_cache.shape[1]
    blocks, rows = np.divmod(slot_mapping, block_tokens)
    k_cache[blocks, rows] = k
    v_cache[blocks, rows] = v


def rope_write_kv(q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray, theta: float,
                  k_cache: np.ndarray, v_cache: np.ndarray, slot_mapping: np.ndarray) -> np.ndarray:
    """The attention's inputs of one layer: q [T, H, D] rotated (returned), k [T, Hkv, D] rotated and
    stored with v at the tokens' cache slots. One op so that a backend may fuse it: the CPU writes the
    rotated keys straight into their slots, the GPU does all of it in one launch instead of three."""
    write_kv(k_cache, v_cache, rope(k, positions, theta), v, slot_mapping)
    return rope(q, positions, theta)


def gather_context(cache: np.ndarray, block_table: np.ndarray, length: int) -> np.ndarray:
    """[N, P, Hkv, D], block table [M] -> the first `length` cached tokens [length, Hkv, D]."""
    num_blocks = -(-length // cache.shape[1])
    return cache[block_table[:num_blocks]].reshape(-1, *cache.shape[2:])[:length]


def _attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, first_position: int,
            scale: float) -> np.ndarray:
    """Causal GQA attention of one sequence.

    q [Q, H, D] holds the queries at positions first_position .. first_position + Q - 1;
    keys/values [L, Hkv, D] hold positions 0 .. L - 1 (L = first_position + Q). Query i sees keys
    0 .. first_position + i.
    """
    num_queries, num_heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    group = num_heads // kv_heads
    qg = q.reshape(num_queries, kv_heads, group, head_dim)
    scores = np.einsum("qkgd,tkd->kgqt", qg, keys) * np.float32(scale)          # [Hkv, G, Q, L]
    query_pos = first_position + np.arange(num_queries)
    allowed = np.arange(keys.shape[0])[None, :] <= query_pos[:, None]           # [Q, L]
    scores = np.where(allowed, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    out = np.einsum("kgqt,tkd->qkgd", weights, values)                          # [Q, Hkv, G, D]
    return out.reshape(num_queries, num_heads, head_dim)


def prefill_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_tables: np.ndarray,
                      query_start: np.ndarray, context_lens: np.ndarray, scale: float) -> np.ndarray:
    """q [T, H, D] packed over B sequences (sequence b owns rows query_start[b]:query_start[b+1]);
    its queries are the last tokens of its context_lens[b] cached tokens (so a chunked prefill or a
    cached prefix works). -> [T, H, D]."""
    out = np.empty_like(q)
    for b in range(len(context_lens)):
        lo, hi = int(query_start[b]), int(query_start[b + 1])
        length = int(context_lens[b])
        keys = gather_context(k_cache, block_tables[b], length)
        values = gather_context(v_cache, block_tables[b], length)
        out[lo:hi] = _attend(q[lo:hi], keys, values, length - (hi - lo), scale)
    return out


def decode_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_tables: np.ndarray,
                     context_lens: np.ndarray, scale: float) -> np.ndarray:
    """q [B, H, D]: one new query per sequence, at the last of its context_lens[b] cached tokens."""
    query_start = np.arange(len(context_lens) + 1)
    return prefill_attention(q, k_cache, v_cache, block_tables, query_start, context_lens, scale)


# ---------------------------------------------------------------- sampling (host side, every backend)
@dataclass(frozen=True)
class SamplingSettings:
    """How one sequence picks its next token. temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    frequency_penalty: float = 0.0   # OpenAI's: minus this per earlier occurrence in the output
    presence_penalty: float = 0.0    # OpenAI's: minus this once a token has occurred in the output
    logit_bias: tuple[tuple[int, float], ...] = ()   # OpenAI's: (token id, added to its logit)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether the model's logits change before the pick (so a greedy pick is not their argmax)."""
        return self.penalized or bool(self.logit_bias)


def sample(logits: np.ndarray, settings: SamplingSettings, rng: np.random.Generator,
           output_ids: Sequence[int] = ()) -> int:
    """[V] -> one token id. The logit bias, penalties for the tokens already in `output_ids`, then
    temperature, top-k, top-p (nucleus), and one draw from `rng` (or the argmax, at temperature 0).

    Each request owns its `rng` (seeded from the request's seed), so its draws do not depend on
    which other requests share the batch: the same seed gives the same text, batched or not.
    """
    if settings.logit_bias:
        logits = logits.astype(np.float32, copy=True)
        ids, bias = zip(*settings.logit_bias)
        logits[list(ids)] += np.asarray(bias, dtype=np.float32)
    if settings.penalized and len(output_ids):
        logits = penalize(logits, output_ids, settings.frequency_penalty, settings.presence_penalty)
    if settings.greedy:
        return int(np.argmax(logits))
    ids, probs = sampling_candidates(logits, settings)
    cdf = np.cumsum(probs)
    pick = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(ids[min(pick, len(ids) - 1)])


def penalize(logits: np.ndarray, output_ids: Sequence[int], frequency: float, presence: float) -> np.ndarray:
    """[V] -> a copy with OpenAI's penalties: each token that occurred c > 0 times in the output
    so far loses c * frequency + presence (negative penalties favour repeats)."""
    ids, counts = np.unique(np.asarray(output_ids), return_counts=True)
    out = logits.astype(np.float32, copy=True)
    out[ids] -= (counts * frequency + presence).astype(np.float32)
    return out


def top_logprobs(logits: np.ndarray, token_id: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """[V] raw logits -> (log-probability of `token_id`, the k likeliest (id, log-probability), most
    likely first, ties by lower id). From the model's own logits, before any bias, penalty or
    temperature (vLLM's default), so they say what the model thinks, whatever the request then did
    with it."""
    peak = float(logits.max())
    # exp in float32 (vectorised), summed in float64: ~1e-7 off in the log, at a fifth of the cost
    log_total = float(np.log(np.exp(logits - np.float32(peak), dtype=np.float32).sum(dtype=np.float64)))
    top = _sorted_prefix(logits, k) if k else np.empty(0, dtype=np.int64)
    return (float(logits[token_id]) - peak - log_total,
            tuple((int(i), float(logits[i]) - peak - log_total) for i in top))


def sampling_candidates(logits: np.ndarray, settings: SamplingSettings) -> tuple[np.ndarray, np.ndarray]:
    """[V] -> (ids, probabilities) of the tokens a draw may pick (temperature > 0).

    The definition: sort the vocabulary by logit (most likely first, ties by lower id), keep the
    first top_k, take the softmax of logit / temperature over them, keep the smallest prefix whose
    mass reaches top_p, renormalise. Two things keep it cheap (a full float64 version took ~9 ms
    per token on the 2-core VM, as much as a fifth of a batch-1 decode step):
    - only as much of the vocabulary is sorted as the cuts need (`_sorted_prefix`): a chat model's
      nucleus is a few dozen tokens of 49,152; without a cut nothing is sorted, and the draw walks
      the vocabulary in id order, which is the same distribution;
    - exp runs in float32 (vectorised; numpy's float64 exp is scalar without AVX-512) on values
      shifted to at most 0; sums and probabilities are float64: ~1e-7 relative error in each.
    """
    vocab = len(logits)
    inv_t = np.float32(1.0 / settings.temperature)
    peak = logits.max()

    def weights(ids: np.ndarray | None) -> np.ndarray:
        chosen = logits if ids is None else logits[ids]
        return np.exp((chosen - peak) * inv_t, dtype=np.float32)

    if 0 < settings.top_k < vocab:
        ids = _sorted_prefix(logits, settings.top_k)
        kept = weights(ids)
        total = kept.sum(dtype=np.float64)
    else:
        everything = weights(None)
        total = everything.sum(dtype=np.float64)
        if settings.top_p >= 1.0:
            return np.arange(vocab), everything.astype(np.float64) / total
        for length in _growing(64, vocab):        # a nucleus longer than the sorted prefix: sort more
            ids = _sorted_prefix(logits, length)
            kept = everything[ids]
            if kept.sum(dtype=np.float64) >= settings.top_p * total:
                break
    probs = kept.astype(np.float64) / total
    if settings.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), settings.top_p)) + 1   # always at least one
        ids, probs = ids[:keep], probs[:keep]
    return ids, probs / probs.sum()


def _growing(first: int, last: int):
    """first, 8 x first, 64 x first, ... up to and including last."""
    length = first
    while length < last:
        yield length
        length *= 8
    yield last


def _sorted_prefix(values: np.ndarray, n: int) -> np.ndarray:
    """The first n ids of np.argsort(-values, kind="stable"), sorting only the values that can be
    among them: every value at least the n-th largest, found by a partial partition."""
    if n >= len(values):
        return np.argsort(-values, kind="stable")
    threshold = np.partition(values, len(values) - n)[len(values) - n]
    ids = np.flatnonzero(values >= threshold)        # ascending ids: a stable sort keeps ties in id order
    return ids[np.argsort(-values[ids], kind="stable")][:n]


# ---------------------------------------------------------------- the backend object
class ReferenceKernels:
    """The numpy backend: the functions above behind the `Kernels` protocol."""

    name = "reference"

    def asarray(self, host: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(host)

    def to_numpy(self, a: Array) -> np.ndarray:
        return np.asarray(a)

    def zeros(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        """A KV pool: zero pages that cost nothing until written, 4 KiB at a time. numpy backs large
        arrays with 2 MiB transparent huge pages, and a [L, N, ...] pool is written a few blocks per
        layer at a time, so a short prompt's first blocks would zero one huge page in each of 2 × L
        places (120 MiB for SmolLM2's 30 layers, ~0.3 s on the 2-core VM of docs/BENCHMARKS.md)."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if nbytes == 0:
            return np.zeros(shape, dtype=dtype)
        pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            pages.madvise(mmap.MADV_NOHUGEPAGE)
        return np.frombuffer(pages, dtype=dtype).reshape(shape)

    def move_blocks(self, src_cache: np.ndarray, dst_cache: np.ndarray, src_ids: np.ndarray,
                    dst_ids: np.ndarray) -> None:
        """Copy blocks src_ids of src_cache into blocks dst_ids of dst_cache (axis 1 = blocks of
        a [L, N, P, Hkv, D] cache): how a KV resize compacts the used blocks into a new pool."""
        dst_cache[:, dst_ids] = src_cache[:, src_ids]

    def argmax(self, logits: np.ndarray) -> np.ndarray:
        return np.argmax(logits, axis=-1)

    embedding = staticmethod(embedding)
    rms_norm = staticmethod(rms_norm)
    add_rms_norm = staticmethod(add_rms_norm)
    linear = staticmethod(linear)
    rope = staticmethod(rope)
    silu_mul = staticmethod(silu_mul)
    mlp = staticmethod(mlp)
    write_kv = staticmethod(write_kv)
    rope_write_kv = staticmethod(rope_write_kv)
    prefill_attention = staticmethod(prefill_attention)
    decode_attention = staticmethod(decode_attention)
