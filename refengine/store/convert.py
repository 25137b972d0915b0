"""GGUF (llama.cpp) -> HF Llama: float32 tensors under HF names, and an HF-style config.

The mapping and the q/k un-permutation are the ones verified bit for bit against transformers in
`shared/golden/README.md`. Shapes and hyper-parameters come from the GGUF metadata, never from
constants here, so another Llama-family GGUF converts the same way.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

# GGUF per-layer tensor kind -> HF module path inside `model.layers.{i}`.
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # only in untied GGUFs
}
_REQUIRED = object()


def field(reader: GGUFReader, key: str, default=_REQUIRED):
    """A metadata value as a Python scalar, string or list; `default` when the key is absent."""
    f = reader.fields.get(key)
    if f is not None:
        return f.contents()
    if default is _REQUIRED:
        raise ValueError(f"GGUF has no metadata key {key!r}")
    return default


def hf_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    blk, layer, kind, suffix = gguf_name.split(".")
    if blk != "blk" or kind not in LAYER_NAMES or suffix != "weight":
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{layer}.{LAYER_NAMES[kind]}.weight"


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rope interleave: GGUF row h*D + 2j + s -> HF row h*D + s*D/2 + j.

    llama.cpp rotates adjacent pairs (2j, 2j+1); HF's `rotate_half` pairs (j, j + D/2). The converter
    reordered q/k rows so both agree; HF-layout kernels need the original order back.
    [rows, cols] -> [rows, cols]
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_tensors(reader: GGUFReader) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, float32 array in HF shape) for every GGUF tensor, one at a time."""
    n_heads = field(reader, "llama.attention.head_count")
    n_kv_heads = field(reader, "llama.attention.head_count_kv", n_heads)
    for t in reader.tensors:
        shape = [int(n) for n in reversed(t.shape)]  # ggml lists ne[0] (the contiguous dim) first
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
        if ".attn_q." in t.name:
            w = unpermute(w, n_heads)
        elif ".attn_k." in t.name:
            w = unpermute(w, n_kv_heads)
        yield hf_name(t.name), np.ascontiguousarray(w)


def hf_config(reader: GGUFReader) -> dict:
    """HF LlamaConfig keys, read from the GGUF metadata."""
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama GGUFs are supported, this one is {arch!r}")
    hidden = field(reader, "llama.embedding_length")
    n_heads = field(reader, "llama.attention.head_count")
    vocab = len(field(reader, "tokenizer.ggml.tokens"))
    names = {t.name for t in reader.tensors}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": field(reader, "llama.feed_forward_length"),
        "num_hidden_layers": field(reader, "llama.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": field(reader, "llama.attention.head_count_kv", n_heads),
        "head_dim": field(reader, "llama.attention.key_length", hidden // n_heads),
        "rope_theta": field(reader, "llama.rope.freq_base", 10000.0),
        "rms_norm_eps": field(reader, "llama.attention.layer_norm_rms_epsilon"),
        "vocab_size": field(reader, "llama.vocab_size", vocab),
        "max_position_embeddings": field(reader, "llama.context_length"),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id", field(reader, "tokenizer.ggml.eos_token_id")),
        "torch_dtype": "float32",
    }
