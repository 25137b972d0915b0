"""Peers measured on this machine beside the engine: llama.cpp (llama-cpp-python) and PyTorch +
transformers, on the same SmolLM2 weights, returning plain tokens/s from the median step.

Each function runs one configuration the way its project is normally driven, timing only the work
being compared:
- decode: B sequences that already hold `context` tokens each advance one token per step; the
  median step gives B / step tokens/s. The context is filled without timing (llama.cpp: one prompt
  prefilled, then copied to every sequence's KV stream; transformers: random K/V in a DynamicCache,
  since decode cost does not depend on the values).
- prefill: one prompt of `length` tokens in one call, median of `repeats`, on an empty cache.

Weights: llama.cpp reads a GGUF (`gguf_export.exported_gguf` writes the F32/F16 ones from the very
tensors refengine serves; the shipped Q4_1 is `gguf_export.source_gguf()`); transformers loads the
HF-layout `model.safetensors` + `config.json` that `prepare` writes into the model cache.
Both peers are optional (`pip install 'refengine[bench]'`) and imported inside the functions;
`unavailable` says before any timing why they cannot run.

Threads: both peers run their CPU work on OpenMP pools with their own defaults (`threads` workers
that spin between parallel regions), which is fastest on a quiet machine and collapses beside any
other busy process (llama.cpp's batch-8 decode measured 2.5-3.6 tok/s instead of ~220 on 2 cores).
Measured in a process that already runs refengine's CPU backend they inherit its spin limit
(`GOMP_SPINCOUNT`, see `kernels.cpu_pool`).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

VOCAB_LOW = 100   # random prompt ids stay clear of the control tokens


def unavailable(device_kind: str) -> str | None:
    """Why the peers of `device_kind` ("cpu" or "cuda") cannot run in this environment, or None.

    transformers 5.25 requires Hugging Face's `kernels` package, whose import name is that of
    refengine's `kernels/`: in one process only one of them can be imported, and transformers then
    fails on ours. Older transformers import it only if installed, so it must not be.
    """
    needed = ["torch", "transformers"] + (["llama_cpp"] if device_kind == "cpu" else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        return f"--peers needs {', '.join(missing)}: pip install -e '.[bench]'"
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return ("Hugging Face's `kernels` package is installed and shadows refengine's kernels/ "
            "(transformers 5.25 and later require it): pip uninstall -y kernels && "
            "pip install 'transformers<5.25'")


def _median_rate(tokens_per_call: int, timed: Callable[[], None], calls: int) -> float:
    """tokens_per_call / median seconds of `calls` runs of `timed`."""
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        timed()
        seconds.append(time.perf_counter() - started)
    return tokens_per_call / statistics.median(seconds)


def _prompt(length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(VOCAB_LOW, vocab, length)


# ---------------------------------------------------------------- llama.cpp
class _LlamaCpp:
    """A llama.cpp context with one KV stream per sequence, driven through the C API's batches."""

    def __init__(self, gguf: Path, num_seqs: int, ctx_per_seq: int, threads: int):
        import llama_cpp as lc
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)   # llama.cpp's loading chatter
        self.lc = lc
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        params = lc.llama_context_default_params()
        params.n_ctx = num_seqs * -(-ctx_per_seq // 256) * 256   # llama.cpp pads each stream to 256
        params.n_batch = params.n_ubatch = max(512, num_seqs)
        params.n_seq_max = num_seqs
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = False         # each sequence attends over its own stream only
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(params.n_batch, 0, 1)
        self.n_batch = params.n_batch

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def decode(self, tokens: np.ndarray, positions: np.ndarray, seq_ids: np.ndarray) -> None:
        """One llama_decode of up to n_batch tokens; logits of the last token of each call."""
        batch, n = self.batch, len(tokens)
        batch.n_tokens = n
        for i in range(n):
            batch.token[i], batch.pos[i] = int(tokens[i]), int(positions[i])
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = int(seq_ids[i])
            batch.logits[i] = i == n - 1
        if self.lc.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        self.lc.llama_synchronize(self.ctx)

    def prefill(self, prompt: np.ndarray, seq_id: int = 0) -> None:
        for start in range(0, len(prompt), self.n_batch):
            chunk = prompt[start:start + self.n_batch]
            self.decode(chunk, np.arange(start, start + len(chunk)), np.full(len(chunk), seq_id))


def llama_cpp_decode(gguf: Path, batch: int, context: int, steps: int = 16, threads: int = 2) -> float:
    """Decode tokens/s of llama.cpp with `batch` sequences at `context` cached tokens each."""
    runner = _LlamaCpp(gguf, batch, context + steps + 1, threads)
    try:
        runner.prefill(_prompt(context, runner.vocab))
        memory = runner.lc.llama_get_memory(runner.ctx)
        for b in range(1, batch):
            runner.lc.llama_memory_seq_cp(memory, 0, b, -1, -1)
        rng = np.random.default_rng(1)
        position = [context]

        def step() -> None:
            runner.decode(rng.integers(VOCAB_LOW, runner.vocab, batch), np.full(batch, position[0]),
                          np.arange(batch))
            position[0] += 1

        step()  # warm-up
        return _median_rate(batch, step, steps)
    finally:
        runner.close()


def llama_cpp_prefill(gguf: Path, length: int, repeats: int = 3, threads: int = 2) -> float:
    """Prefill tokens/s of llama.cpp for one prompt of `length` tokens on an empty cache."""
    runner = _LlamaCpp(gguf, 1, length + 1, threads)
    try:
        prompt = _prompt(length, runner.vocab)

        def prefill() -> None:
            runner.clear()
            runner.prefill(prompt)

        prefill()  # warm-up
        return _median_rate(length, prefill, repeats)
    finally:
        runner.close()


# ---------------------------------------------------------------- PyTorch + transformers
def load_transformers(model_dir: Path, threads: int = 2):
    """LlamaForCausalLM in float32 from the model cache's HF-layout config.json + model.safetensors."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.set_num_threads(threads)
    config = LlamaConfig.from_json_file(str(Path(model_dir) / "config.json"))
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    state = load_file(str(Path(model_dir) / "model.safetensors"))
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state)
    return model


def transformers_decode(model, batch: int, context: int, steps: int = 16) -> float:
    """Decode tokens/s of transformers' forward with `batch` sequences at `context` cached tokens."""
    import torch
    from transformers import DynamicCache
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (batch, cfg.num_key_value_heads, context, head_dim)
    with torch.inference_mode():
        cache = DynamicCache(config=cfg)
        for layer in range(cfg.num_hidden_layers):
            cache.update(torch.randn(shape), torch.randn(shape), layer)
        generator = torch.Generator().manual_seed(1)
        position = [context]

        def step() -> None:
            ids = torch.randint(VOCAB_LOW, cfg.vocab_size, (batch, 1), generator=generator)
            positions = torch.full((batch, 1), position[0])
            model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True)
            position[0] += 1

        step()  # warm-up
        return _median_rate(batch, step, steps)


def transformers_prefill(model, length: int, repeats: int = 3) -> float:
    """Prefill tokens/s of transformers' forward for one prompt of `length` tokens."""
    import torch
    ids = torch.from_numpy(_prompt(length, model.config.vocab_size)).unsqueeze(0)
    with torch.inference_mode():
        def prefill() -> None:
            model(input_ids=ids, use_cache=True)

        prefill()  # warm-up
        return _median_rate(length, prefill, repeats)
