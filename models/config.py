"""The architecture hyper-parameters of a Llama-family model, read from its HF-style config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int              # E
    intermediate_size: int        # F
    num_hidden_layers: int        # L
    num_attention_heads: int      # H
    num_key_value_heads: int      # Hkv
    head_dim: int                 # D
    vocab_size: int               # V
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int  # the context limit
    tie_word_embeddings: bool = True
    eos_token_id: int = 2

    @classmethod
    def from_json(cls, path: Path) -> "LlamaConfig":
        raw = json.loads(Path(path).read_text())
        num_heads = raw["num_attention_heads"]
        return cls(
            hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=num_heads,
            num_key_value_heads=raw.get("num_key_value_heads", num_heads),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            vocab_size=raw["vocab_size"], rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_norm_eps=float(raw["rms_norm_eps"]),
            max_position_embeddings=raw["max_position_embeddings"],
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            eos_token_id=raw.get("eos_token_id", 2),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token, float32."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * 4

    @property
    def projection_parameters(self) -> int:
        """The weights of the per-layer GEMMs (q, k, v, o, gate, up, down): those a bf16 prefill
        route keeps a copy of (`kernels.bf16`)."""
        e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = e * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        return self.num_hidden_layers * (attn + 3 * e * f)

    @property
    def num_parameters(self) -> int:
        e = self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.projection_parameters + self.num_hidden_layers * 2 * e + e + lm_head
