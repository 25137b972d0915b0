"""The Llama decoder (SmolLM2 and its kin), written once against the kernel interface.

The forward pass takes the packed tokens of one engine step (a prefill chunk of several prompts, or
one new token per running sequence), writes their keys and values into the paged KV cache, and
returns the logits of each sequence's last token. It never asks which backend or device it runs on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Protocol

import numpy as np

from kernels.interface import Array, Kernels
from models.config import LlamaConfig


@dataclass(frozen=True)
class StepInputs:
    """The step metadata the forward pass needs (all host numpy arrays).

    Sequence b owns rows query_start[b]:query_start[b+1] of the packed tokens; after this step its
    cache holds context_lens[b] tokens, the new ones last. A decode step has one row per sequence.
    """

    is_prefill: bool
    token_ids: np.ndarray      # [T] int64
    positions: np.ndarray      # [T] int64
    slot_mapping: np.ndarray   # [T] int64: cache slot (block * P + row) of each token
    block_tables: np.ndarray   # [B, M] int32, padded with -1
    query_start: np.ndarray    # [B + 1] int32
    context_lens: np.ndarray   # [B] int32

    @property
    def last_token_rows(self) -> np.ndarray:
        """[B]: the row of each sequence's last token, whose logits pick its next token."""
        return self.query_start[1:] - 1


@dataclass
class LayerWeights:
    input_norm: Array   # [E]
    qkv: Array          # [(H + 2 Hkv) D, E]: q, k and v projections stacked, one GEMM for all three
    o: Array            # [E, H D]
    post_norm: Array    # [E]
    gate_up: Array      # [2F, E]: gate and up stacked, one GEMM for both
    down: Array         # [E, F]


LAYER_FIELDS = ("input_norm", "qkv", "o", "post_norm", "gate_up", "down")


HEAD_PART = "head"          # the embedding and every norm: small, and needed before and inside every layer
LM_HEAD_PART = "lm_head"    # an untied lm_head, needed only after the last layer (none when tied)


def layer_part(i: int) -> str:
    """Layer i's four matrices: all it waits for while a cold model is still arriving."""
    return f"layer{i}"


class WeightArrival(Protocol):
    """Weights still on their way to the device (execute-while-load, λScale): `wait(part)` returns
    once that part's tensors are resident, or raises the error that stopped the load."""

    def wait(self, part: str) -> None: ...


class Resident:
    """Every weight is already in place: waiting costs nothing."""

    def wait(self, part: str) -> None:
        pass


def final_layout(tensors: Mapping[str, np.ndarray], config: LlamaConfig) -> Iterator[tuple[str, str, np.ndarray]]:
    """(part, name, float32 host array) of every weight as the forward pass uses it, in load order.

    Projections that share an input are stacked here (q|k|v, gate|up), once: a checkpoint written in
    this layout loads with no copies. The order is the forward pass's, so a model whose weights arrive
    in it can start computing before the last layer lands.
    """
    def get(name: str) -> np.ndarray:
        return np.ascontiguousarray(tensors[name], dtype=np.float32)

    layers = range(config.num_hidden_layers)
    yield HEAD_PART, "embed", get("model.embed_tokens.weight")
    yield HEAD_PART, "norm", get("model.norm.weight")
    for i in layers:
        yield HEAD_PART, f"layers.{i}.input_norm", get(f"model.layers.{i}.input_layernorm.weight")
        yield HEAD_PART, f"layers.{i}.post_norm", get(f"model.layers.{i}.post_attention_layernorm.weight")
    for i in layers:
        p = f"model.layers.{i}."
        yield layer_part(i), f"layers.{i}.qkv", np.concatenate([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        yield layer_part(i), f"layers.{i}.o", get(p + "self_attn.o_proj.weight")
        yield layer_part(i), f"layers.{i}.gate_up", np.concatenate([get(p + "mlp.gate_proj.weight"),
                                                                    get(p + "mlp.up_proj.weight")])
        yield layer_part(i), f"layers.{i}.down", get(p + "mlp.down_proj.weight")
    if not config.tie_word_embeddings:
        yield LM_HEAD_PART, "lm_head", get("lm_head.weight")


@dataclass
class LlamaWeights:
    embed: Array        # [V, E], also the lm_head (tied)
    layers: list[LayerWeights]
    norm: Array         # [E]
    lm_head: Array      # [V, E]
    arrival: WeightArrival = field(default_factory=Resident)

    @classmethod
    def from_hf(cls, tensors: Mapping[str, np.ndarray], config: LlamaConfig, kernels: Kernels) -> "LlamaWeights":
        """Build from HF-named float32 tensors, stacking projections that share an input."""
        return cls.from_arrays({name: kernels.asarray(a) for _, name, a in final_layout(tensors, config)}, config)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Array], config: LlamaConfig,
                    arrival: WeightArrival | None = None) -> "LlamaWeights":
        """Assemble backend arrays named as `final_layout` names them (no copies). `arrival`: the
        arrays are views whose bytes are still being loaded."""
        layers = [LayerWeights(**{f: arrays[f"layers.{i}.{f}"] for f in LAYER_FIELDS})
                  for i in range(config.num_hidden_layers)]
        embed = arrays["embed"]
        return cls(embed=embed, layers=layers, norm=arrays["norm"], lm_head=arrays.get("lm_head", embed),
                   arrival=arrival or Resident())

    def wait_resident(self) -> None:
        """Return once every weight is in place (at once unless a cold model is still loading)."""
        for part in (HEAD_PART, *(layer_part(i) for i in range(len(self.layers))), LM_HEAD_PART):
            self.arrival.wait(part)

    def nbytes(self) -> int:
        arrays = [self.embed, self.norm] + [getattr(layer, f) for layer in self.layers for f in LAYER_FIELDS]
        if self.lm_head is not self.embed:
            arrays.append(self.lm_head)
        return sum(int(a.nbytes) for a in arrays)


class LlamaModel:
    """One model's weights plus the forward pass; the KV cache belongs to the caller (the engine)."""

    def __init__(self, config: LlamaConfig, weights: LlamaWeights, kernels: Kernels):
        self.config = config
        self.weights = weights
        self.kernels = kernels
        self.scale = 1.0 / float(np.sqrt(config.head_dim))

    def forward(self, step: StepInputs, k_cache: Array, v_cache: Array,
                observe: Callable[[str, Array], None] | None = None) -> Array:
        """Run one step. k_cache/v_cache are [L, N, P, Hkv, D]. Returns logits [B, V] of each
        sequence's last token. `observe(name, array)`, if given, sees the residual stream after each
        layer ("layer{i}") and the final-norm output ("final_norm"): how a golden mismatch is
        localised to a layer."""
        cfg, kern, w = self.config, self.kernels, self.weights
        num_tokens = len(step.token_ids)
        q_width = cfg.num_attention_heads * cfg.head_dim
        kv_width = cfg.num_key_value_heads * cfg.head_dim

        arrival = w.arrival   # a cold model may still be loading: each stage waits only for its own weights
        arrival.wait(HEAD_PART)
        # token embeddings start the residual stream
        residual = kern.embedding(w.embed, step.token_ids)                              # [T, E]
        hidden = kern.rms_norm(residual, w.layers[0].input_norm, cfg.rms_norm_eps)
        for i, layer in enumerate(w.layers):
            arrival.wait(layer_part(i))
            # attention: q, k, v for these tokens; rotate q and k by position; cache k and v
            qkv = kern.linear(hidden, layer.qkv)                                         # [T, (H+2Hkv) D]
            q = qkv[:, :q_width].reshape(num_tokens, cfg.num_attention_heads, cfg.head_dim)
            k = qkv[:, q_width:q_width + kv_width].reshape(num_tokens, cfg.num_key_value_heads, cfg.head_dim)
            v = qkv[:, q_width + kv_width:].reshape(num_tokens, cfg.num_key_value_heads, cfg.head_dim)
            q = kern.rope_write_kv(q, k, v, step.positions, cfg.rope_theta,
                                   k_cache[i], v_cache[i], step.slot_mapping)
            if step.is_prefill:
                attn = kern.prefill_attention(q, k_cache[i], v_cache[i], step.block_tables,
                                              step.query_start, step.context_lens, self.scale)
            else:
                attn = kern.decode_attention(q, k_cache[i], v_cache[i], step.block_tables,
                                             step.context_lens, self.scale)
            attn_out = kern.linear(attn.reshape(num_tokens, q_width), layer.o)          # [T, E]
            # MLP: residual add + norm, then SwiGLU
            residual, hidden = kern.add_rms_norm(residual, attn_out, layer.post_norm, cfg.rms_norm_eps)
            mlp_out = kern.mlp(hidden, layer.gate_up, layer.down)
            next_norm = w.layers[i + 1].input_norm if i + 1 < len(w.layers) else w.norm
            residual, hidden = kern.add_rms_norm(residual, mlp_out, next_norm, cfg.rms_norm_eps)
            if observe:
                observe(f"layer{i}", residual)
        if observe:
            observe("final_norm", hidden)
        # final norm (already applied by the last add_rms_norm) and the lm_head, last tokens only
        arrival.wait(LM_HEAD_PART)
        return kern.linear(hidden[step.last_token_rows], w.lm_head)                     # [B, V]
