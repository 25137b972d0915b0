"""The physical limit of decode: bytes a step must read, over the memory bandwidth of this machine.

At small batch a decode step reads every weight once and every cached K/V once, and does little
arithmetic per byte, so tokens/s cannot beat batch * bandwidth / bytes_per_step. The bandwidth is
measured here, STREAM-style (a large copy; bytes read + bytes written over time, best of several).
"""
from __future__ import annotations

import time

import numpy as np

from models.config import LlamaConfig


def measure_copy_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes/s of a large numpy copy (read + write counted), the best of `repeats`."""
    src = np.random.default_rng(0).standard_normal(megabytes * (1 << 20) // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.nbytes / best


def decode_bytes_per_step(config: LlamaConfig, weight_bytes: int, batch: int, context: int) -> int:
    """Weights once, plus the K/V of every cached token of every sequence."""
    return weight_bytes + batch * context * config.kv_bytes_per_token


def decode_bound_tokens_per_s(config: LlamaConfig, weight_bytes: int, batch: int, context: int,
                              bandwidth: float) -> float:
    return batch * bandwidth / decode_bytes_per_step(config, weight_bytes, batch, context)
