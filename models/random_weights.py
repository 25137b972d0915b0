"""Random Llama weights from a seed, HF-named: fast unit tests on tiny shapes, and the exact SmolLM2
shape where the real weights cannot travel (the GPU machine takes 64 MiB of files at most)."""
from __future__ import annotations

import numpy as np

from models.config import LlamaConfig

SMOLLM2_135M = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0,
                           rms_norm_eps=1e-5, max_position_embeddings=8192)

TINY = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                   num_key_value_heads=2, head_dim=16, vocab_size=128, rope_theta=10000.0,
                   rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=False)


def random_tensors(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights scaled like a trained model's (std 1/sqrt(fan_in), norms near 1), so activations stay
    in range through every layer. Tiny configs untie the lm_head: with a tied one the current token's
    own embedding dominates the logits and greedy decoding repeats it forever."""
    rng = np.random.default_rng(seed)
    e, f, d = config.hidden_size, config.intermediate_size, config.head_dim

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(e)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": rng.standard_normal((config.vocab_size, e), dtype=np.float32),
               "model.norm.weight": norm()}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": matrix(config.num_attention_heads * d, e),
            p + "self_attn.k_proj.weight": matrix(config.num_key_value_heads * d, e),
            p + "self_attn.v_proj.weight": matrix(config.num_key_value_heads * d, e),
            p + "self_attn.o_proj.weight": matrix(e, config.num_attention_heads * d),
            p + "post_attention_layernorm.weight": norm(),
            p + "mlp.gate_proj.weight": matrix(f, e),
            p + "mlp.up_proj.weight": matrix(f, e),
            p + "mlp.down_proj.weight": matrix(e, f),
        })
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = matrix(config.vocab_size, e) * np.float32(4.0)
    return tensors
