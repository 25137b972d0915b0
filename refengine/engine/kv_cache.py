"""The paged KV cache of one instance: a pool of fixed-size blocks and each sequence's block table.

Invariants: a block is either free or in exactly one sequence's block table; a sequence holds
exactly ceil(tokens_reserved / P) blocks; every block goes back to the pool when its sequence
finishes, is aborted or is preempted. Resizing (SLINFER §4.3.2) allocates a new pool, copies the used
blocks into its front (compaction), rewrites the block tables and frees the old pool.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from kernels.interface import Array, Kernels
from models.config import LlamaConfig
from refengine.engine.sequence import Sequence


@dataclass(frozen=True)
class ResizeReport:
    old_blocks: int
    new_blocks: int
    blocks_copied: int
    elapsed_s: float


class PagedKVCache:
    """K and V caches [L, N, P, Hkv, D] plus the free list of block ids."""

    def __init__(self, config: LlamaConfig, kernels: Kernels, num_blocks: int, block_tokens: int = 16):
        if num_blocks < 0 or block_tokens <= 0:
            raise ValueError(f"bad KV cache size: {num_blocks} blocks of {block_tokens} tokens")
        self.config = config
        self.kernels = kernels
        self.block_tokens = block_tokens
        self.k, self.v = self._allocate(num_blocks)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    def _allocate(self, num_blocks: int) -> tuple[Array, Array]:
        cfg = self.config
        shape = (cfg.num_hidden_layers, num_blocks, self.block_tokens, cfg.num_key_value_heads, cfg.head_dim)
        return self.kernels.zeros(shape), self.kernels.zeros(shape)

    # ---- accounting
    @property
    def num_blocks(self) -> int:
        return int(self.k.shape[1])

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def bytes_per_block(self) -> int:
        return self.block_tokens * self.config.kv_bytes_per_token

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_tokens)

    # ---- per-sequence blocks
    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq's block table cover its first num_tokens tokens. False (and no change) if the
        pool is short."""
        missing = self.blocks_for(num_tokens) - len(seq.block_table)
        if missing > len(self._free):
            return False
        for _ in range(max(missing, 0)):
            seq.block_table.append(self._free.pop())
        return True

    def release(self, seq: Sequence) -> None:
        """Return all of seq's blocks to the pool; its cached tokens are gone."""
        self._free.extend(reversed(seq.block_table))
        seq.block_table.clear()
        seq.num_cached_tokens = 0

    def slots(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        """Cache slots (block * P + row) of seq's tokens start..end-1 (their blocks must be reserved)."""
        positions = np.arange(start, end)
        table = np.asarray(seq.block_table, dtype=np.int64)
        return table[positions // self.block_tokens] * self.block_tokens + positions % self.block_tokens

    # ---- elasticity
    def resize(self, num_blocks: int, sequences: list[Sequence]) -> ResizeReport:
        """Reallocate the pool at num_blocks, keeping every listed sequence's cached tokens.

        The used blocks are copied to ids 0..used-1 of the new pool in block-table order, so a
        shrink only needs num_blocks >= blocks in use. Raises ValueError if they do not fit.
        """
        started = time.perf_counter()
        used = [b for seq in sequences for b in seq.block_table]
        if len(used) != self.num_used_blocks:
            raise ValueError("resize must be given every sequence that holds blocks")
        if num_blocks < len(used):
            raise ValueError(f"cannot shrink the KV cache to {num_blocks} blocks: {len(used)} are in use")
        new_k, new_v = self._allocate(num_blocks)
        if used:
            src, dst = np.asarray(used), np.arange(len(used))
            self.kernels.move_blocks(self.k, new_k, src, dst)
            self.kernels.move_blocks(self.v, new_v, src, dst)
        old_blocks = self.num_blocks
        self.k, self.v = new_k, new_v
        next_id = 0
        for seq in sequences:
            seq.block_table[:] = range(next_id, next_id + len(seq.block_table))
            next_id += len(seq.block_table)
        self._free = list(range(num_blocks - 1, next_id - 1, -1))
        return ResizeReport(old_blocks, num_blocks, len(used), time.perf_counter() - started)
