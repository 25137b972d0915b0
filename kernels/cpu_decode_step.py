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
place. On the bf16-weights backend the region's GEMVs read the weights' bf16 tiles with
`bf16_gemv`'s micro-kernel, as that backend's op-by-op path does. Prefill steps, observed steps,
steps of more than `MAX_SEQUENCES` sequences or on the bf16 GEMM route go to `model.forward`, as
does a step the region could not run (an angle table too short, or a threading layer that would
not give each part a thread of its own).

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
from numba.extending import overload
from numba.typed import List

from kernels import bf16_gemv
from kernels.bf16 import tiled_weight
from kernels.bf16_gemv import block_rows
from kernels.cpu import add_rms_norm_row, angles_cover, rms_norm_row, rotate_into
from kernels.cpu_decode_attention import attend_item, merge_splits, work_split
from kernels.cpu_math import JIT, silu_times
from kernels.cpu_sync import SYNC_WORDS, barrier, check_in, checked_in
from kernels.cpu_threads import POOL_THREADS
from kernels.few_token_gemm import GEMV_MAX_TOKENS, gemv_item_count, gemv_items
from kernels.interface import Array
from kernels.model_wrapper import ModelWrapper

MAX_SEQUENCES = GEMV_MAX_TOKENS    # more, and the few-token GEMM (not the GEMV) is the faster kernel
assert MAX_SEQUENCES <= bf16_gemv.MOST_ROWS     # a region's bf16-weights step is one the op-by-op path reads bf16


def share_of_gemv(x, w, out, gated, part, parts, pass_tokens):
    """out = x @ w.T (gated: SwiGLU) for this part's contiguous share of the GEMV. w is float32
    [O, I] (`few_token_gemm.gemv_items`' work items), or on the bf16-weights backend a bf16 weight's tiles
    [O/16, pairs, 16, 2] (`bf16_gemv`'s micro-kernel per 16 outputs, `pass_tokens` tokens a pass);
    Numba picks the body by w's type when it compiles the program."""


@numba.njit(**JIT)
def _share_of_tiles(x, tiles, out, gated, part, parts, pass_tokens):
    """`share_of_gemv` over a bf16 weight's tiles. A unit of work is 16 outputs, or gated a block of
    16 gate outputs and the block of their 16 up ones (`TileWeight.pack_gated`), whose SwiGLU this
    part then writes itself, as `bf16_gemv.swiglu` does."""
    units = tiles.shape[0] // 2 if gated else tiles.shape[0]
    rows, pairs, block_bytes = x.shape[0], x.shape[1] // 2, tiles.shape[1] * 64
    both = np.empty((rows, 32), np.float32)
    for unit in range(part * units // parts, (part + 1) * units // parts):
        t = 0
        while t < rows:
            tokens = min(rows - t, pass_tokens)
            x_at = x.ctypes.data + t * x.strides[0]
            if gated:
                for half in range(2):
                    block_rows(tokens, x_at, x.strides[0], tiles.ctypes.data + (2 * unit + half) * block_bytes,
                               pairs, both.ctypes.data + t * both.strides[0] + 64 * half, both.strides[0])
            else:
                block_rows(tokens, x_at, x.strides[0], tiles.ctypes.data + unit * block_bytes, pairs,
                           out.ctypes.data + unit * 64 + t * out.strides[0], out.strides[0])
            t += tokens
        if gated:
            for t in range(rows):
                for i in range(16):
                    out[t, 16 * unit + i] = silu_times(both[t, i], both[t, 16 + i])


@overload(share_of_gemv, inline="always", jit_options=JIT)
def _share_of_gemv_for(x, w, out, gated, part, parts, pass_tokens):
    if w.ndim == 2:
        def float32_share(x, w, out, gated, part, parts, pass_tokens):
            items = gemv_item_count(out)
            gemv_items(x, w, out, gated, part * items // parts, (part + 1) * items // parts)
        return float32_share

    def bf16_share(x, w, out, gated, part, parts, pass_tokens):
        _share_of_tiles(x, w, out, gated, part, parts, pass_tokens)
    return bf16_share


@functools.cache
def _program(head_dim: int, group: int, block_tokens: int, kv_heads: int):
    """The step compiled for one model's attention shape: ints only in the closure, the constants
    `cpu_decode_attention.attend_item` wants (see `cpu_decode_attention._attention` for why
    nothing else)."""

    @numba.njit(parallel=True, **JIT)
    def decode_step(ids, positions, slot_mapping, block_tables, context_lens, embed, input_norms, qkv, o, post_norms,
                    gate_up, down, final_norm, lm_head, k_cache, v_cache, cos, sin, eps, scale, features,
                    pass_tokens, logits, pool, parts):
        """logits [B, V] of one decode step; k_cache / v_cache [L, N, P, Hkv, D] get the new keys and
        values. False, with nothing done, if the angle table is too short or the parts could not each
        have a thread. `parts` threads run it; the attention's keys are split as for `pool` threads,
        as the op-by-op path splits them (`cpu_decode_attention.work_split`). The weights are float32
        arrays or bf16 tiles (`share_of_gemv`); `features` is the MLP's width F."""
        if not angles_cover(positions, cos):
            return False
        seqs, width, layers = ids.shape[0], embed.shape[1], len(qkv)
        heads = kv_heads * group
        splits, kv_per_item = work_split(seqs, kv_heads, pool)
        items = seqs * (kv_heads // kv_per_item) * splits
        # shared: each part writes its own rows / items of these, read by all after a barrier
        qkv_out = np.empty((seqs, (heads + 2 * kv_heads) * head_dim), np.float32)
        peaks = np.empty((seqs, heads, splits), np.float32)
        totals = np.empty_like(peaks)
        partial = np.empty((seqs, heads, splits, head_dim), np.float32)
        o_out = np.empty((seqs, width), np.float32)
        act = np.empty((seqs, features), np.float32)
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
                share_of_gemv(hidden, qkv[layer], qkv_out, False, part, parts, pass_tokens)
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
                share_of_gemv(attn_rows, o[layer], o_out, False, part, parts, pass_tokens)
                barrier(sync, parts)
                for t in range(seqs):
                    add_rms_norm_row(residual, o_out, t, post_norms[layer], eps, residual, hidden)
                share_of_gemv(hidden, gate_up[layer], act, True, part, parts, pass_tokens)
                barrier(sync, parts)
                share_of_gemv(act, down[layer], down_out, False, part, parts, pass_tokens)
                barrier(sync, parts)
                next_norm = input_norms[layer + 1] if layer + 1 < layers else final_norm
                for t in range(seqs):
                    add_rms_norm_row(residual, down_out, t, next_norm, eps, residual, hidden)
            share_of_gemv(hidden, lm_head, logits, False, part, parts, pass_tokens)
        return checked_in(sync, parts)

    return decode_step


class CpuDecodeModel(ModelWrapper):
    """A model whose decode steps of up to `MAX_SEQUENCES` sequences run as one parallel region;
    everything else is the wrapped model's (`models.llama.LlamaModel` on `CpuKernels`)."""

    def __init__(self, model: Any):
        super().__init__(model)
        self._weights: tuple | None = None     # the typed lists, once every weight is resident

    def forward(self, step: Any, k_cache: Array, v_cache: Array,
                observe: Callable[[str, Array], None] | None = None) -> Array:
        """`model.forward`, as one parallel region for small decode steps."""
        kernels, cfg = self.model.kernels, self.model.config
        batch = len(step.context_lens)
        bf16_route = kernels.bf16 is not None and batch >= kernels.bf16_min_tokens
        if (step.is_prefill or observe is not None or batch > MAX_SEQUENCES or bf16_route
                or (kernels.bf16_weights and not self._tiles_fit)):
            return self.model.forward(step, k_cache, v_cache, observe)
        cos, sin = kernels.rope_table.get(cfg.head_dim, cfg.rope_theta)
        logits = np.empty((batch, self.model.weights.lm_head.shape[0]), np.float32)
        program = _program(cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads, k_cache.shape[2],
                           cfg.num_key_value_heads)
        ran = program(step.token_ids, step.positions, step.slot_mapping, step.block_tables, step.context_lens,
                      *self._resident_weights(), k_cache, v_cache, cos, sin, np.float32(cfg.rms_norm_eps),
                      np.float32(self.model.scale), cfg.intermediate_size, bf16_gemv.tokens_per_pass(batch), logits,
                      POOL_THREADS, numba.get_num_threads())
        return logits if ran else self.model.forward(step, k_cache, v_cache)

    @functools.cached_property
    def _tiles_fit(self) -> bool:
        """Whether the bf16 tiles' micro-kernel can write every output in place: it writes 16 at a
        time and reads inputs in pairs (SmolLM2 and the test models: yes)."""
        cfg = self.model.config
        outputs = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim, cfg.hidden_size, \
            cfg.intermediate_size, cfg.vocab_size
        inputs = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.intermediate_size
        return all(n % 16 == 0 for n in outputs) and all(n % 2 == 0 for n in inputs)

    def _resident_weights(self) -> tuple:
        """embed, input norms, qkv, o, post norms, gate/up, down, final norm, lm_head; the per-layer
        ones as typed lists (built once, after waiting for a cold model's last weights). On the
        bf16-weights backend the projections and the lm_head are their bf16 tiles, the very copies
        the op-by-op path reads (`kernels.bf16.tiled_weight`)."""
        if self._weights is None:
            w = self.model.weights
            w.wait_resident()
            bf16 = self.model.kernels.bf16_weights

            def gemv_operand(array: np.ndarray, gated: bool = False) -> np.ndarray:
                return tiled_weight(array, gated).tiles if bf16 else array

            def per_layer(field: str, operand: Callable = lambda array: array) -> List:
                return List([operand(getattr(layer, field)) for layer in w.layers])

            self._weights = (w.embed, per_layer("input_norm"), per_layer("qkv", gemv_operand),
                             per_layer("o", gemv_operand), per_layer("post_norm"),
                             per_layer("gate_up", lambda array: gemv_operand(array, gated=True)),
                             per_layer("down", gemv_operand), w.norm, gemv_operand(w.lm_head))
        return self._weights
