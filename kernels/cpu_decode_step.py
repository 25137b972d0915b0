"""A decode step of a few sequences as one compiled parallel region: on the CPU, what CUDA graphs
are on the GPU (`kernels.gpu_graph`).

Why: at batch 1 a step is ~180 kernel calls from Python, each a Numba dispatch and a parallel
launch, run on caches the weight stream has just evicted. On the Zen 3 VM the step's GEMVs alone
took ~97% of llama.cpp's whole step (docs/benchmarks_cpu_kernels.md, 2026-12-07). Here each thread
runs the whole step: its share of every GEMV's weight rows, the small ops, and a barrier wherever
it needs the others' results (`kernels.cpu_sync`, ~0.1 us).

What each thread does, per layer (B sequences, one token each):
1. its share of the qkv rows -> barrier;
2. RoPE of every q (each thread keeps its own copy), and the K/V write of the sequences it owns ->
   barrier;
3. its share of the attention's work items (`cpu_decode_attention.attend_item`) -> barrier;
4. the merge of those parts (each thread on its own), then its share of the o rows -> barrier;
5. residual add + RMSNorm (each thread on its own copy), its share of gate/up with SiLU ->
   barrier;
6. its share of the down rows -> barrier; residual add + the next RMSNorm.

It runs the same arithmetic as the op-by-op forward (`models.llama.LlamaModel.forward` on
`CpuKernels`), through the same helpers, in the same order, so tokens and logits match it (tested).

`CpuDecodeModel` wraps a model the way `GraphedDecodeModel` does and is handed to `Instance` in its
place. Prefill steps, observed steps, steps of more than `MAX_SEQUENCES` sequences, and the bf16
weights backend go to `model.forward`, as does a step the region could not run (an angle table
too short, or a threading layer that would not give each part a thread of its own).

This departs from DESIGN.md's rule that the forward pass is written once (in `models/llama.py`):
the program below writes the decode step of the same Llama layer a second time, for the one case
where calling the kernels one by one from Python costs more than the work between calls.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import numba
import numpy as np
from numba import prange
from numba.typed import List

from kernels.cpu import GEMV_MAX_TOKENS, add_rms_norm_row, angles_cover, gemv_item_count, gemv_items, rms_norm_row, \
    rotate_into
from kernels.cpu_decode_attention import attend_item, merge_splits, work_split
from kernels.cpu_math import JIT
from kernels.cpu_sync import SYNC_WORDS, barrier, check_in, checked_in
from kernels.cpu_threads import POOL_THREADS
from kernels.interface import Array

MAX_SEQUENCES = GEMV_MAX_TOKENS    # more, and the few-token GEMM (not the GEMV) is the faster kernel


@numba.njit(inline="always", **JIT)
def _share_of_gemv(x, w, out, gated, part, parts):
    """out = x @ w.T (gated: SwiGLU) for this part's contiguous share of the GEMV's work items."""
    items = gemv_item_count(out)
    gemv_items(x, w, out, gated, part * items // parts, (part + 1) * items // parts)


@functools.cache
def _program(head_dim: int, group: int, block_tokens: int, kv_heads: int):
    """The step compiled for one model's attention shape: ints only in the closure, the constants
    `cpu_decode_attention.attend_item` wants (see `cpu_decode_attention._attention` for why
    nothing else)."""

    @numba.njit(parallel=True, **JIT)
    def decode_step(ids, positions, slot_mapping, block_tables, context_lens, embed, input_norms, qkv, o, post_norms,
                    gate_up, down, final_norm, lm_head, k_cache, v_cache, cos, sin, eps, scale, logits, pool, parts):
        """logits [B, V] of one decode step; k_cache / v_cache [L, N, P, Hkv, D] get the new keys and
        values. False, with nothing done, if the angle table is too short or the parts could not each
        have a thread. `parts` threads run it; the attention's keys are split as for `pool` threads,
        as the op-by-op path splits them (`cpu_decode_attention.work_split`)."""
        if not angles_cover(positions, cos):
            return False
        seqs, width, layers = ids.shape[0], embed.shape[1], len(qkv)
        heads = kv_heads * group
        splits, kv_per_item = work_split(seqs, kv_heads, pool)
        items = seqs * (kv_heads // kv_per_item) * splits
        # shared: each part writes its own rows / items of these, read by all after a barrier
        qkv_out = np.empty((seqs, qkv[0].shape[0]), np.float32)
        peaks = np.empty((seqs, heads, splits), np.float32)
        totals = np.empty_like(peaks)
        partial = np.empty((seqs, heads, splits, head_dim), np.float32)
        o_out = np.empty((seqs, width), np.float32)
        act = np.empty((seqs, down[0].shape[1]), np.float32)
        down_out = np.empty((seqs, width), np.float32)
        sync = np.zeros(SYNC_WORDS, np.int64)
        for part in prange(parts):
            if not check_in(sync, parts):
                continue
            # each part's own copies of what every part needs whole
            residual = np.empty((seqs, width), np.float32)
            hidden = np.empty((seqs, width), np.float32)
            q = np.empty((seqs, heads, head_dim), np.float32)
            attn = np.empty((seqs, heads, head_dim), np.float32)
            attn_rows = attn.reshape((seqs, heads * head_dim))
            for t in range(seqs):
                residual[t] = embed[ids[t]]
                rms_norm_row(residual, t, input_norms[0], eps, hidden)
            for layer in range(layers):
                _share_of_gemv(hidden, qkv[layer], qkv_out, False, part, parts)
                barrier(sync, parts)
                projected = qkv_out.reshape((seqs, heads + 2 * kv_heads, head_dim))   # q heads, k heads, v heads
                k_layer, v_layer = k_cache[layer], v_cache[layer]
                for b in range(seqs):
                    c, s = cos[positions[b]], sin[positions[b]]
                    for h in range(heads):
                        rotate_into(projected, b, h, c, s, q[b, h])
                    if b % parts == part:
                        block, row = slot_mapping[b] // block_tokens, slot_mapping[b] % block_tokens
                        for h in range(kv_heads):
                            rotate_into(projected, b, heads + h, c, s, k_layer[block, row, h])
                            v_layer[block, row, h] = projected[b, heads + kv_heads + h]
                barrier(sync, parts)
                for item in range(part * items // parts, (part + 1) * items // parts):
                    attend_item(item, q, k_layer, v_layer, block_tables, context_lens, kv_per_item, splits, scale,
                                peaks, totals, partial, head_dim, group, block_tokens)
                barrier(sync, parts)
                merge_splits(peaks, totals, partial, attn)
                _share_of_gemv(attn_rows, o[layer], o_out, False, part, parts)
                barrier(sync, parts)
                for t in range(seqs):
                    add_rms_norm_row(residual, o_out, t, post_norms[layer], eps, residual, hidden)
                _share_of_gemv(hidden, gate_up[layer], act, True, part, parts)
                barrier(sync, parts)
                _share_of_gemv(act, down[layer], down_out, False, part, parts)
                barrier(sync, parts)
                next_norm = input_norms[layer + 1] if layer + 1 < layers else final_norm
                for t in range(seqs):
                    add_rms_norm_row(residual, down_out, t, next_norm, eps, residual, hidden)
            _share_of_gemv(hidden, lm_head, logits, False, part, parts)
        return checked_in(sync, parts)

    return decode_step


class CpuDecodeModel:
    """A model whose decode steps of up to `MAX_SEQUENCES` sequences run as one parallel region;
    everything else is the wrapped model's (`models.llama.LlamaModel` on `CpuKernels`)."""

    def __init__(self, model: Any):
        self.model = model
        self._weights: tuple | None = None     # the typed lists, once every weight is resident

    def __getattr__(self, name: str) -> Any:
        # config, kernels, weights: the wrapped model's (only called for names not found here)
        return getattr(self.__dict__["model"], name)

    def forward(self, step: Any, k_cache: Array, v_cache: Array,
                observe: Callable[[str, Array], None] | None = None) -> Array:
        """`model.forward`, as one parallel region for small decode steps."""
        kernels, cfg = self.model.kernels, self.model.config
        batch = len(step.context_lens)
        reads_bf16 = kernels.bf16_weights or (kernels.bf16 is not None and batch >= kernels.bf16_min_tokens)
        if step.is_prefill or observe is not None or batch > MAX_SEQUENCES or reads_bf16:
            return self.model.forward(step, k_cache, v_cache, observe)
        cos, sin = kernels.rope_table.get(cfg.head_dim, cfg.rope_theta)
        logits = np.empty((batch, self.model.weights.lm_head.shape[0]), np.float32)
        program = _program(cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads, k_cache.shape[2],
                           cfg.num_key_value_heads)
        ran = program(step.token_ids, step.positions, step.slot_mapping, step.block_tables, step.context_lens,
                      *self._resident_weights(), k_cache, v_cache, cos, sin, np.float32(cfg.rms_norm_eps),
                      np.float32(self.model.scale), logits, POOL_THREADS, numba.get_num_threads())
        return logits if ran else self.model.forward(step, k_cache, v_cache)

    def _resident_weights(self) -> tuple:
        """embed, input norms, qkv, o, post norms, gate/up, down, final norm, lm_head; the per-layer
        ones as typed lists (built once, after waiting for a cold model's last weights)."""
        if self._weights is None:
            w = self.model.weights
            w.wait_resident()
            layers = lambda field: List([getattr(layer, field) for layer in w.layers])   # noqa: E731
            self._weights = (w.embed, layers("input_norm"), layers("qkv"), layers("o"), layers("post_norm"),
                             layers("gate_up"), layers("down"), w.norm, w.lm_head)
        return self._weights
