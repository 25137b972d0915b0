"""Synthetic engine steps for benchmarks: B sequences already holding `context` cached tokens.

Decode cost depends on how many tokens are cached, not on their values, so a benchmark can skip the
minutes of prefill that filling 64 x 1024 tokens would take and time `model.forward` on a paged
cache of random values (never zeros: a kernel must not be timed on a trivially compressible input).
The step is built exactly as `Instance` builds one: block tables, slot mapping, context lengths.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np

from models.config import LlamaConfig
from models.llama import LlamaModel, StepInputs

BLOCK_TOKENS = 16


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of `run`, which must end synchronised with its device (as argmax does)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def random_cache(model: LlamaModel, num_blocks: int, seed: int = 0):
    """K and V caches [L, N, P, Hkv, D] of random values on the model's backend."""
    cfg = model.config
    shape = (cfg.num_hidden_layers, num_blocks, BLOCK_TOKENS, cfg.num_key_value_heads, cfg.head_dim)
    rng = np.random.default_rng(seed)
    return tuple(model.kernels.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(2))


def decode_step(config: LlamaConfig, batch: int, context: int, rng: np.random.Generator) -> StepInputs:
    """One new token for each of `batch` sequences holding `context` cached tokens, in consecutive blocks."""
    per_seq = -(-(context + 1) // BLOCK_TOKENS)
    tables = np.arange(batch * per_seq, dtype=np.int32).reshape(batch, per_seq)
    slots = tables[:, context // BLOCK_TOKENS].astype(np.int64) * BLOCK_TOKENS + context % BLOCK_TOKENS
    return StepInputs(is_prefill=False, token_ids=rng.integers(100, config.vocab_size, batch),
                      positions=np.full(batch, context, dtype=np.int64), slot_mapping=slots,
                      block_tables=tables, query_start=np.arange(batch + 1, dtype=np.int32),
                      context_lens=np.full(batch, context + 1, dtype=np.int32))


def prefill_step(config: LlamaConfig, num_tokens: int, rng: np.random.Generator) -> StepInputs:
    """One prompt of `num_tokens` tokens, into blocks 0, 1, ..."""
    blocks = -(-num_tokens // BLOCK_TOKENS)
    return StepInputs(is_prefill=True, token_ids=rng.integers(100, config.vocab_size, num_tokens),
                      positions=np.arange(num_tokens), slot_mapping=np.arange(num_tokens),
                      block_tables=np.arange(blocks, dtype=np.int32)[None, :],
                      query_start=np.array([0, num_tokens], dtype=np.int32),
                      context_lens=np.array([num_tokens], dtype=np.int32))


def decode_tokens_per_s(model: LlamaModel, batch: int, context: int, repeats: int = 16) -> float:
    """Decode tokens/s of `model.forward` + argmax (the ids reach the host) at batch x context."""
    step = decode_step(model.config, batch, context, np.random.default_rng(batch))
    k_cache, v_cache = random_cache(model, int(step.block_tables.size))
    kern = model.kernels
    return batch / median_seconds(lambda: kern.argmax(model.forward(step, k_cache, v_cache)), repeats)


def prefill_tokens_per_s(model: LlamaModel, num_tokens: int, repeats: int = 3) -> float:
    """Prefill tokens/s of one prompt of `num_tokens` tokens in one step."""
    step = prefill_step(model.config, num_tokens, np.random.default_rng(num_tokens))
    k_cache, v_cache = random_cache(model, int(step.block_tables.size))
    kern = model.kernels
    return num_tokens / median_seconds(lambda: kern.argmax(model.forward(step, k_cache, v_cache)),
                                       repeats, warmup=1)
