"""The reference kernels against brute-force definitions (loops, float64, dense unpaged K/V)."""
import numpy as np
import pytest

from kernels import reference as ref

RNG = np.random.default_rng(1234)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_rms_norm_matches_float64_definition():
    x, w = randn(7, 33), randn(33)
    expected = x.astype(np.float64) / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(ref.rms_norm(x, w, 1e-5), expected, rtol=1e-5, atol=1e-6)
    summed, normed = ref.add_rms_norm(x, x * 0.5, w, 1e-5)
    np.testing.assert_allclose(summed, 1.5 * x, rtol=1e-6)
    np.testing.assert_allclose(normed, ref.rms_norm(1.5 * x, w, 1e-5), rtol=1e-5)


def test_silu_mul_and_linear():
    gate_up = randn(5, 2 * 12)
    g, u = gate_up[:, :12].astype(np.float64), gate_up[:, 12:].astype(np.float64)
    np.testing.assert_allclose(ref.silu_mul(gate_up), g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)
    x, w = randn(4, 9), randn(6, 9)
    np.testing.assert_allclose(ref.linear(x, w), [[sum(x[t, i] * w[o, i] for i in range(9)) for o in range(6)]
                                                   for t in range(4)], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rope_rotates_pairs_j_and_j_plus_half(head_dim):
    x, positions, theta = randn(6, 3, head_dim), np.array([0, 1, 5, 17, 300, 8000]), 100000.0
    out = ref.rope(x, positions, theta)
    half = head_dim // 2
    for t, pos in enumerate(positions):
        for j in range(half):
            angle = pos * theta ** (-2 * j / head_dim)
            z = (x[t, :, j] + 1j * x[t, :, j + half]) * np.exp(1j * angle)
            np.testing.assert_allclose(out[t, :, j], z.real, atol=2e-5)
            np.testing.assert_allclose(out[t, :, j + half], z.imag, atol=2e-5)


def dense_causal_attention(q, keys, values, first_position, scale):
    """Loops over heads and queries; keys/values [L, Hkv, D]; float64."""
    num_queries, heads, _ = q.shape
    group = heads // keys.shape[1]
    out = np.zeros(q.shape)
    for i in range(num_queries):
        visible = first_position + i + 1
        for h in range(heads):
            k, v = keys[:visible, h // group].astype(np.float64), values[:visible, h // group].astype(np.float64)
            s = k @ q[i, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v
    return out


def paged(lengths, heads, kv_heads, head_dim, block_tokens=16, spare_blocks=5):
    """Random K/V for each sequence, scattered into shuffled blocks of a shared pool."""
    needed = [-(-n // block_tokens) for n in lengths]
    num_blocks = sum(needed) + spare_blocks
    k_cache, v_cache = randn(num_blocks, block_tokens, kv_heads, head_dim), randn(num_blocks, block_tokens, kv_heads, head_dim)
    ids = RNG.permutation(num_blocks)
    tables = np.full((len(lengths), max(needed)), -1, dtype=np.int32)
    dense = []
    start = 0
    for b, (n, m) in enumerate(zip(lengths, needed)):
        tables[b, :m] = ids[start:start + m]
        start += m
        keys, values = randn(n, kv_heads, head_dim), randn(n, kv_heads, head_dim)
        slots = tables[b, np.arange(n) // block_tokens].astype(np.int64) * block_tokens + np.arange(n) % block_tokens
        ref.write_kv(k_cache, v_cache, keys, values, slots)
        dense.append((keys, values))
    return k_cache, v_cache, tables, dense


@pytest.mark.parametrize("lengths,query_lens", [([1], [1]), ([15, 16, 17], [15, 3, 17]), ([300, 5], [44, 5]), ([33], [1])])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (8, 2)])
def test_prefill_attention_matches_dense(lengths, query_lens, heads, kv_heads):
    head_dim, scale = 16, 0.25
    k_cache, v_cache, tables, dense = paged(lengths, heads, kv_heads, head_dim)
    q = randn(sum(query_lens), heads, head_dim)
    query_start = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    out = ref.prefill_attention(q, k_cache, v_cache, tables, query_start, np.array(lengths, np.int32), scale)
    for b, (n, qn) in enumerate(zip(lengths, query_lens)):
        lo, hi = query_start[b], query_start[b + 1]
        expected = dense_causal_attention(q[lo:hi], *dense[b], n - qn, scale)
        np.testing.assert_allclose(out[lo:hi], expected, rtol=1e-4, atol=1e-5)


def test_decode_attention_is_prefill_with_one_query_each():
    lengths = [1, 16, 17, 300]
    k_cache, v_cache, tables, dense = paged(lengths, 9, 3, 64)
    q = randn(len(lengths), 9, 64)
    out = ref.decode_attention(q, k_cache, v_cache, tables, np.array(lengths, np.int32), 0.125)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(out[b:b + 1], dense_causal_attention(q[b:b + 1], *dense[b], n - 1, 0.125),
                                   rtol=1e-4, atol=1e-5)


def test_move_blocks_copies_whole_blocks():
    src, dst = randn(2, 6, 4, 1, 3), np.zeros((2, 3, 4, 1, 3), np.float32)
    ref.ReferenceKernels().move_blocks(src, dst, np.array([5, 1]), np.array([0, 2]))
    np.testing.assert_array_equal(dst[:, 0], src[:, 5])
    np.testing.assert_array_equal(dst[:, 2], src[:, 1])
    assert not dst[:, 1].any()


@pytest.mark.parametrize("shape", [(30, 40, 16, 3, 64), (2, 0, 16, 3, 64), (1, 1, 1, 1, 1)])
def test_kv_pool_zeros_are_zero_writable_and_freed_with_the_array(shape):
    """Big pools come from an anonymous mapping without huge pages (see `ReferenceKernels.zeros`)."""
    pool = ref.ReferenceKernels().zeros(shape)
    assert pool.shape == shape and pool.dtype == np.float32 and pool.flags.c_contiguous
    assert not pool.any()
    values = randn(*shape)
    pool[...] = values
    np.testing.assert_array_equal(pool, values)
    view = pool[:, :1]
    del pool
    np.testing.assert_array_equal(view, values[:, :1])           # a view keeps the mapping alive


class TestSampling:
    logits = randn(50) * 3

    def draw(self, settings, seed, n=1):
        rng = np.random.default_rng(seed)
        return [ref.sample(self.logits, settings, rng) for _ in range(n)]

    def test_greedy_and_degenerate_settings_pick_argmax(self):
        best = int(np.argmax(self.logits))
        assert self.draw(ref.SamplingSettings(), 0) == [best]
        assert set(self.draw(ref.SamplingSettings(temperature=1.0, top_k=1), 0, 20)) == {best}
        assert set(self.draw(ref.SamplingSettings(temperature=1.0, top_p=1e-6), 0, 20)) == {best}

    def test_seed_reproduces_and_top_k_limits_support(self):
        settings = ref.SamplingSettings(temperature=1.5, top_k=5)
        assert self.draw(settings, 7, 30) == self.draw(settings, 7, 30)
        assert set(self.draw(settings, 7, 200)) <= set(np.argsort(-self.logits)[:5].tolist())

    def test_temperature_frequencies_follow_softmax(self):
        settings = ref.SamplingSettings(temperature=2.0)
        counts = np.bincount(self.draw(settings, 3, 4000), minlength=50) / 4000
        p = np.exp(self.logits / 2.0 - (self.logits / 2.0).max())
        np.testing.assert_allclose(counts, p / p.sum(), atol=0.03)

    def test_top_p_keeps_smallest_prefix_reaching_mass(self):
        settings = ref.SamplingSettings(temperature=1.0, top_p=0.6)
        p = np.exp(self.logits - self.logits.max())
        p /= p.sum()
        order = np.argsort(-p)
        keep = int(np.searchsorted(np.cumsum(p[order]), 0.6)) + 1
        assert set(self.draw(settings, 11, 500)) <= set(order[:keep].tolist())


def brute_force_candidates(logits, settings):
    """The sampling definition, literally: sort all of the vocabulary, cut, renormalise (float64)."""
    scaled = logits.astype(np.float64) / settings.temperature
    order = np.argsort(-scaled, kind="stable")
    if settings.top_k > 0:
        order = order[:settings.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if settings.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), settings.top_p)) + 1
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return order, probs


@pytest.mark.parametrize("vocab", [1, 7, 64, 65, 1000, 49152])
@pytest.mark.parametrize("temperature, top_p, top_k", [
    (1.0, 1.0, 0), (0.2, 0.9, 0), (1.0, 0.9, 0), (2.0, 0.999, 0), (0.7, 1.0, 50), (1.3, 0.95, 200),
    (1.0, 0.5, 3), (0.5, 1e-6, 0), (1.0, 0.99, 100000)])
def test_sampling_candidates_equal_the_full_sort(vocab, temperature, top_p, top_k):
    """Sorting only the prefix the cuts need changes nothing: the same tokens in the same order,
    the same probabilities (up to float32 exp), also with tied logits and peaked or flat ones."""
    settings = ref.SamplingSettings(temperature=temperature, top_p=top_p, top_k=top_k)
    for spread in (0.5, 3.0, 12.0):
        logits = (randn(vocab) * spread).round(1)            # rounding makes ties
        ids, probs = ref.sampling_candidates(logits, settings)
        order, expected = brute_force_candidates(logits, settings)
        if top_p >= 1.0 and not 0 < top_k < vocab:            # no cut: candidates come in id order
            by_rank = np.argsort(-logits[ids], kind="stable")
            ids, probs = ids[by_rank], probs[by_rank]
        np.testing.assert_array_equal(ids, order)
        np.testing.assert_allclose(probs, expected, rtol=2e-6, atol=1e-12)


def test_sampling_a_large_vocabulary_draws_from_its_nucleus():
    """The draw over a 49,152-token vocabulary lands only in the nucleus and follows its probabilities."""
    logits = randn(49152) * 4
    settings = ref.SamplingSettings(temperature=0.7, top_p=0.8)
    ids, probs = brute_force_candidates(logits, settings)
    rng = np.random.default_rng(5)
    draws = [ref.sample(logits, settings, rng) for _ in range(3000)]
    assert set(draws) <= set(ids.tolist())
    frequency = np.array([draws.count(i) for i in ids[:5]]) / len(draws)
    np.testing.assert_allclose(frequency, probs[:5], atol=0.03)


def test_penalties_follow_openais_definition():
    """logit[t] - count(t) * frequency - (count(t) > 0) * presence, only for tokens already output."""
    logits, output = randn(20), [3, 7, 3, 3, 19]
    got = ref.penalize(logits, output, frequency=0.5, presence=1.5)
    expected = logits.astype(np.float64).copy()
    for t in set(output):
        expected[t] -= output.count(t) * 0.5 + 1.5
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got is not logits and not np.shares_memory(got, logits)


def test_penalties_steer_greedy_and_sampled_draws_away_from_repeats():
    logits = np.zeros(5, np.float32)
    logits[2] = 1.0
    rng = np.random.default_rng(0)
    assert ref.sample(logits, ref.SamplingSettings(), rng, [2, 2]) == 2                      # no penalty
    assert ref.sample(logits, ref.SamplingSettings(presence_penalty=2.0), rng, [2, 2]) == 0  # next best
    assert ref.sample(logits, ref.SamplingSettings(frequency_penalty=-1.5), rng, [4]) == 4   # negative: repeat
    settings = ref.SamplingSettings(temperature=1.0, top_k=1, frequency_penalty=0.6)
    assert ref.sample(logits, settings, rng, [2, 2]) == 0


def test_logit_bias_is_added_before_the_pick():
    logits = randn(30)
    best = int(np.argmax(logits))
    rng = np.random.default_rng(0)
    forced = int(np.argmin(logits))
    assert ref.sample(logits, ref.SamplingSettings(logit_bias=((forced, 100.0),)), rng) == forced
    banned = ref.SamplingSettings(temperature=1.0, logit_bias=((best, -100.0),))
    assert best not in {ref.sample(logits, banned, rng) for _ in range(200)}
    assert ref.SamplingSettings(logit_bias=((1, 0.5),)).adjusts_logits and not ref.SamplingSettings().adjusts_logits


@pytest.mark.parametrize("vocab,k", [(7, 0), (50, 3), (49152, 20)])
def test_top_logprobs_are_the_log_softmax_of_the_raw_logits(vocab, k):
    logits = (randn(vocab) * 4).astype(np.float32)
    token = int(np.random.default_rng(vocab).integers(vocab))
    exact = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    logprob, top = ref.top_logprobs(logits, token, k)
    assert logprob == pytest.approx(exact[token], abs=1e-6)
    order = np.argsort(-logits, kind="stable")[:k]
    assert [i for i, _ in top] == order.tolist()
    np.testing.assert_allclose([lp for _, lp in top], exact[order], atol=1e-6)
