"""Every CuPy kernel against its numpy twin in kernels.reference, on fresh random inputs of many
shapes: batch 1..64, contexts 1..2048 across block boundaries, GQA groups 1/3/4, head dims 64/128.

Outputs are compared by ||out - ref|| / ||ref|| (float32 arithmetic lands far under 1e-5 here);
pure copies and argmax must match exactly. Before each op its output size is poisoned with NaN in
CuPy's pool, so an element the kernel forgets to write shows up.
"""
from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="needs CUDA and CuPy: cupy is not installed")
if not cupy.is_available():
    pytest.skip("needs CUDA and CuPy: no CUDA device is visible", allow_module_level=True)

from kernels import reference as ref  # noqa: E402
from kernels.gpu import GpuKernels  # noqa: E402

pytestmark = pytest.mark.gpu
BLOCK_TOKENS = 16


@pytest.fixture(scope="module")
def kern() -> GpuKernels:
    return GpuKernels("cuda:0")


@pytest.fixture
def rng(request) -> np.random.Generator:
    """Fresh inputs for every test case, reproducible from its name."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def poison(*shape: int) -> None:
    """Leave a NaN-filled block of this size free in the pool, where the next output will land."""
    cupy.full(shape, np.nan, dtype=cupy.float32)


def rel_err(out, expected: np.ndarray) -> float:
    out = cupy.asnumpy(out)
    assert out.shape == expected.shape and np.isfinite(out).all()
    return float(np.linalg.norm(out - expected) / max(np.linalg.norm(expected), 1e-30))


# ---------------------------------------------------------------- elementwise, norms, matmul
@pytest.mark.parametrize("tokens, width", [(1, 64), (7, 576), (300, 576), (33, 2048)])
def test_norms(kern, rng, tokens, width):
    x, delta, weight = normal(rng, tokens, width), normal(rng, tokens, width), normal(rng, width)
    poison(tokens, width)
    assert rel_err(kern.rms_norm(kern.asarray(x), kern.asarray(weight), 1e-5), ref.rms_norm(x, weight, 1e-5)) < 1e-6
    summed, normed = kern.add_rms_norm(kern.asarray(x), kern.asarray(delta), kern.asarray(weight), 1e-5)
    want_summed, want_normed = ref.add_rms_norm(x, delta, weight, 1e-5)
    assert rel_err(summed, want_summed) < 1e-7 and rel_err(normed, want_normed) < 1e-6


# every GEMV tile size, its edges and cuBLAS past 64 rows; SmolLM2's projections, an odd feature
# count, and the lm_head at the two ends of the GEMV range
LINEAR_CASES = [(t, f, w) for t, (f, w) in itertools.product(
    [1, 2, 3, 5, 8, 16, 17, 33, 64, 65, 200], [(960, 576), (576, 1536), (3072, 576), (100, 64)])]
LINEAR_CASES += [(1, 49152, 576), (64, 49152, 576)]


@pytest.mark.parametrize("tokens, features, width", LINEAR_CASES)
def test_linear(kern, rng, tokens, features, width):
    x, weight = normal(rng, tokens, width), normal(rng, features, width)
    poison(tokens, features)
    assert rel_err(kern.linear(kern.asarray(x), kern.asarray(weight)), ref.linear(x, weight)) < 1e-5


def test_embedding(kern, rng):
    table, ids = normal(rng, 1000, 576), rng.integers(0, 1000, 77)
    poison(77, 576)
    assert np.array_equal(cupy.asnumpy(kern.embedding(kern.asarray(table), ids)), ref.embedding(table, ids))


@pytest.mark.parametrize("tokens, heads, head_dim", [(1, 9, 64), (45, 3, 64), (200, 32, 128)])
def test_rope_on_a_strided_view(kern, rng, tokens, heads, head_dim):
    # q and k reach rope as column slices of the fused qkv output
    packed = normal(rng, tokens, (heads + 5) * head_dim)
    positions = rng.integers(0, 8192, tokens)
    view = kern.asarray(packed)[:, head_dim:(heads + 1) * head_dim].reshape(tokens, heads, head_dim)
    expected = ref.rope(packed[:, head_dim:(heads + 1) * head_dim].reshape(tokens, heads, head_dim), positions, 1e5)
    poison(tokens, heads, head_dim)
    assert rel_err(kern.rope(view, positions, 1e5), expected) < 1e-6


@pytest.mark.parametrize("tokens, width", [(1, 1536), (70, 1536), (3, 10)])
def test_silu_mul(kern, rng, tokens, width):
    gate_up = normal(rng, tokens, 2 * width)
    poison(tokens, width)
    assert rel_err(kern.silu_mul(kern.asarray(gate_up)), ref.silu_mul(gate_up)) < 1e-6


@pytest.mark.parametrize("tokens", [1, 70])
def test_mlp(kern, rng, tokens):
    x, gate_up, down = normal(rng, tokens, 576), normal(rng, 2 * 1536, 576) * 0.05, normal(rng, 576, 1536) * 0.05
    got = kern.mlp(kern.asarray(x), kern.asarray(gate_up), kern.asarray(down))
    assert rel_err(got, ref.mlp(x, gate_up, down)) < 1e-5


@pytest.mark.parametrize("rows, vocab", [(1, 49152), (64, 49152), (5, 100)])
def test_argmax_takes_the_first_maximum(kern, rng, rows, vocab):
    logits = normal(rng, rows, vocab)
    logits[:, vocab // 3] = logits[:, 2 * vocab // 3] = 10.0  # a tie: numpy answers the first
    assert np.array_equal(kern.argmax(kern.asarray(logits)), ref.ReferenceKernels().argmax(logits))


# ---------------------------------------------------------------- paged KV cache
def paged_cache(rng, lengths: list[int], kv_heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random caches [N, P, Hkv, D] and block tables [B, M] scattering each sequence's blocks over the
    pool in random order, padded with -1."""
    counts = [-(-n // BLOCK_TOKENS) for n in lengths]
    num_blocks = sum(counts) + 3
    order = rng.permutation(num_blocks).astype(np.int32)
    tables = np.full((len(lengths), max(counts)), -1, dtype=np.int32)
    start = 0
    for b, count in enumerate(counts):
        tables[b, :count] = order[start:start + count]
        start += count
    shape = (num_blocks, BLOCK_TOKENS, kv_heads, head_dim)
    return normal(rng, *shape), normal(rng, *shape), tables


def test_write_kv_skips_padding_slots(kern, rng):
    k_cache, v_cache, _ = paged_cache(rng, [64], 3, 64)
    packed = normal(rng, 20, 9 * 64)  # k and v as strided column slices, as the model passes them
    k, v = packed[:, :192].reshape(20, 3, 64), packed[:, 192:384].reshape(20, 3, 64)
    slots = rng.permutation(k_cache.shape[0] * BLOCK_TOKENS)[:20]
    slots[[3, 11]] = -1
    gpu_k, gpu_v, gpu_packed = kern.asarray(k_cache), kern.asarray(v_cache), kern.asarray(packed)
    kern.write_kv(gpu_k, gpu_v, gpu_packed[:, :192].reshape(20, 3, 64), gpu_packed[:, 192:384].reshape(20, 3, 64), slots)
    keep = slots >= 0
    ref.write_kv(k_cache, v_cache, k[keep], v[keep], slots[keep])
    assert np.array_equal(cupy.asnumpy(gpu_k), k_cache) and np.array_equal(cupy.asnumpy(gpu_v), v_cache)


def test_rope_write_kv(kern, rng):
    """The model's one call for q, k and v of a layer (column slices of the qkv product), one fused
    launch; a token with slot -1 (a captured batch's padding row) stores nothing."""
    k_cache, v_cache, _ = paged_cache(rng, [64], 3, 64)
    packed = normal(rng, 20, 15 * 64)
    positions, slots = rng.integers(0, 8192, 20), rng.permutation(k_cache.shape[0] * BLOCK_TOKENS)[:20]
    slots[7] = -1
    views = [kern.asarray(packed)[:, a * 64:b * 64].reshape(20, b - a, 64) for a, b in ((0, 9), (9, 12), (12, 15))]
    gpu_k, gpu_v = kern.asarray(k_cache), kern.asarray(v_cache)
    got = kern.rope_write_kv(*views, positions, 1e5, gpu_k, gpu_v, slots)
    q, k, v = (packed[:, a * 64:b * 64].reshape(20, b - a, 64) for a, b in ((0, 9), (9, 12), (12, 15)))
    stored = slots >= 0
    ref.write_kv(k_cache, v_cache, ref.rope(k, positions, 1e5)[stored], v[stored], slots[stored])
    assert rel_err(got, ref.rope(q, positions, 1e5)) < 1e-6
    assert rel_err(gpu_k, k_cache) < 1e-6 and np.array_equal(cupy.asnumpy(gpu_v), v_cache)


def test_move_blocks(kern, rng):
    src, dst = normal(rng, 2, 10, BLOCK_TOKENS, 3, 64), normal(rng, 2, 6, BLOCK_TOKENS, 3, 64)
    src_ids, dst_ids = np.array([7, 2, 9]), np.array([0, 1, 2])
    gpu_dst = kern.asarray(dst)
    kern.move_blocks(kern.asarray(src), gpu_dst, src_ids, dst_ids)
    ref.ReferenceKernels().move_blocks(src, dst, src_ids, dst_ids)
    assert np.array_equal(cupy.asnumpy(gpu_dst), dst)


GROUPS = [(3, 1), (3, 3), (2, 4)]  # (Hkv, G): MHA, SmolLM2's GQA, Llama-style G = 4
DECODE_LENGTHS = {"one token": [1], "block edges": [15, 16, 17, 33], "long": [2048],
                  "batch 8": "random 8 2048", "batch 64": "random 64 700"}


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv_heads, group", GROUPS)
@pytest.mark.parametrize("case", list(DECODE_LENGTHS))
def test_decode_attention(kern, rng, case, kv_heads, group, head_dim):
    lengths = DECODE_LENGTHS[case]
    if isinstance(lengths, str):
        _, batch, longest = lengths.split()
        lengths = rng.integers(1, int(longest) + 1, int(batch)).tolist()
    k_cache, v_cache, tables = paged_cache(rng, lengths, kv_heads, head_dim)
    q = normal(rng, len(lengths), kv_heads * group, head_dim)
    context_lens = np.asarray(lengths, dtype=np.int32)
    scale = head_dim ** -0.5
    expected = ref.decode_attention(q, k_cache, v_cache, tables, context_lens, scale)
    gpu_q, gpu_k, gpu_v = kern.asarray(q), kern.asarray(k_cache), kern.asarray(v_cache)
    for _ in range(2):  # the second launch finds the split counters the first one left at zero
        poison(*q.shape)
        assert rel_err(kern.decode_attention(gpu_q, gpu_k, gpu_v, tables, context_lens, scale), expected) < 1e-5


PREFILL_CASES = {"single tokens": [(1, 1), (1, 1)], "block edges": [(16, 16), (17, 17), (15, 15)],
                 "chunked and cached prefixes": [(17, 40), (33, 1000), (1, 300), (100, 100)],
                 "long prompt": [(2048, 2048)]}


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv_heads, group", GROUPS)
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_attention(kern, rng, case, kv_heads, group, head_dim):
    """(queries, context) per sequence: the queries are the last tokens of the context."""
    queries, lengths = zip(*PREFILL_CASES[case])
    k_cache, v_cache, tables = paged_cache(rng, list(lengths), kv_heads, head_dim)
    q = normal(rng, sum(queries), kv_heads * group, head_dim)
    query_start = np.concatenate([[0], np.cumsum(queries)]).astype(np.int32)
    context_lens = np.asarray(lengths, dtype=np.int32)
    scale = head_dim ** -0.5
    poison(*q.shape)
    out = kern.prefill_attention(kern.asarray(q), kern.asarray(k_cache), kern.asarray(v_cache), tables,
                                 query_start, context_lens, scale)
    expected = ref.prefill_attention(q, k_cache, v_cache, tables, query_start, context_lens, scale)
    assert rel_err(out, expected) < 1e-5
