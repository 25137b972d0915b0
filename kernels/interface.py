"""The one kernel interface every backend implements (numpy reference, Numba CPU, CuPy GPU).

`models/llama.py` is written once against this protocol and never asks which backend it has. Shapes
use the same letters everywhere:

    T tokens in the step (all sequences, packed)    B sequences in the step
    E model width       F MLP width       V vocabulary
    H query heads       Hkv key/value heads       D head dim       G = H // Hkv
    N KV blocks in the pool     P tokens per block      M blocks in the longest block table

The paged KV cache of one layer is a pair of arrays `[N, P, Hkv, D]`; a token at cache slot `s`
lives in block `s // P`, row `s % P`. A sequence's block table lists its blocks in order, padded
with -1 to M entries.

Arrays are whatever the backend computes on (numpy or cupy); index arrays (`ids`, `positions`,
`slot_mapping`, `block_tables`, `query_start`, `context_lens`) arrive as numpy int32/int64 and the
backend moves them where it needs them.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

Array = Any  # numpy.ndarray or cupy.ndarray, float32 unless stated


class Kernels(Protocol):
    """What a backend provides. Every method has a numpy twin in `kernels.reference`."""

    name: str

    # ---- memory: moving arrays to and from the backend's device
    def asarray(self, host: np.ndarray) -> Array: ...
    def to_numpy(self, a: Array) -> np.ndarray: ...
    def zeros(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Array: ...
    def move_blocks(self, src_cache: Array, dst_cache: Array, src_ids: np.ndarray, dst_ids: np.ndarray) -> None: ...

    # ---- the transformer's ops
    def embedding(self, table: Array, ids: np.ndarray) -> Array: ...
    def rms_norm(self, x: Array, weight: Array, eps: float) -> Array: ...
    def add_rms_norm(self, residual: Array, delta: Array, weight: Array, eps: float) -> tuple[Array, Array]: ...
    def linear(self, x: Array, weight: Array) -> Array: ...
    def rope(self, x: Array, positions: np.ndarray, theta: float) -> Array: ...
    def silu_mul(self, gate_up: Array) -> Array: ...
    def mlp(self, x: Array, gate_up: Array, down: Array) -> Array: ...
    def write_kv(self, k_cache: Array, v_cache: Array, k: Array, v: Array, slot_mapping: np.ndarray) -> None: ...
    def rope_write_kv(self, q: Array, k: Array, v: Array, positions: np.ndarray, theta: float,
                      k_cache: Array, v_cache: Array, slot_mapping: np.ndarray) -> Array: ...
    def prefill_attention(self, q: Array, k_cache: Array, v_cache: Array, block_tables: np.ndarray,
                          query_start: np.ndarray, context_lens: np.ndarray, scale: float) -> Array: ...
    def decode_attention(self, q: Array, k_cache: Array, v_cache: Array, block_tables: np.ndarray,
                         context_lens: np.ndarray, scale: float) -> Array: ...
    def argmax(self, logits: Array) -> np.ndarray: ...
