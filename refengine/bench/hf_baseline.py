"""PyTorch + transformers eager decode on the same GPU and the same random weights: the baseline the
CuPy backend is measured against (fp32, `LlamaForCausalLM`, greedy, HF's KV cache)."""
from __future__ import annotations

import statistics
import time

import numpy as np

from models.config import LlamaConfig


def build_hf_model(config: LlamaConfig, tensors: dict[str, np.ndarray]):
    """LlamaForCausalLM on cuda:0 with our HF-named tensors loaded (lm_head tied to the embedding)."""
    import torch
    import transformers

    theta = config.rope_theta
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=True,
        # transformers 5 reads rope_parameters, 4 reads rope_theta
        rope_theta=theta, rope_parameters={"rope_type": "default", "rope_theta": theta})
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hf_config).float().eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy continuation of one prompt: the check that both engines run the same model."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=num_tokens,
                             min_new_tokens=num_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def hf_decode_seconds(model, batch: int, context: int, steps: int, warmup: int = 3) -> float:
    """Median seconds of one greedy decode step of `batch` sequences after a `context`-token prompt."""
    import torch

    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(0, model.config.vocab_size, (batch, context)), device="cuda")
    times = []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for i in range(warmup + steps):
            started = time.perf_counter()
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            token.cpu()  # the sampled ids reach the host, as in a server
            if i >= warmup:
                times.append(time.perf_counter() - started)
    del past, out
    torch.cuda.empty_cache()
    return statistics.median(times)
