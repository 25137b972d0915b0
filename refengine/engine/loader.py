"""Prepared weights in the model cache -> a LlamaModel on a backend, plus its tokenizer."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.numpy import load_file

from kernels.interface import Kernels
from models.config import LlamaConfig
from models.llama import LlamaModel, LlamaWeights
from refengine.engine.tokenizer import Tokenizer
from refengine.store.cache import PREPARE_HINT, ModelCacheError, ModelFiles, is_prepared, model_files, verify
from refengine.store.prepare import prepare


@dataclass
class LoadedModel:
    model: LlamaModel
    tokenizer: Tokenizer
    files: ModelFiles
    load_s: float   # reading + converting + moving the weights to the backend


def ensure_prepared(weights: str, home: Path | None = None, progress: bool = True) -> ModelFiles:
    """The cache entry for `weights`, preparing it first if it is missing or incomplete."""
    if not is_prepared(weights, home):
        return prepare(weights, home=home, progress=progress)
    return model_files(weights, home)


def load_llama(files: ModelFiles, kernels: Kernels) -> LlamaModel:
    """The model's weights from the cache onto `kernels`' device (the cheap cache check first)."""
    verify(files)
    try:
        tensors = load_file(str(files.weights))
    except (SafetensorError, OSError) as e:
        raise ModelCacheError(f"cannot read {files.weights}: {e}; {PREPARE_HINT}") from None
    config = LlamaConfig.from_json(files.config)
    return with_decode_graphs(LlamaModel(config, LlamaWeights.from_hf(tensors, config, kernels), kernels))


def with_decode_graphs(model: LlamaModel) -> LlamaModel:
    """On the CuPy backend, decode steps replay captured CUDA graphs: a small-batch step is ~350
    kernel launches, which cost more from Python than the kernels run (6x at batch 1 on an H200,
    docs/benchmarks_gpu.md). Prefill and large batches still run eagerly; other backends as they are."""
    if getattr(model.kernels, "name", None) != "cuda":
        return model
    from kernels.gpu_graph import GraphedDecodeModel
    return GraphedDecodeModel(model)


def load_model(weights: str, kernels: Kernels, home: Path | None = None, auto_prepare: bool = True) -> LoadedModel:
    files = ensure_prepared(weights, home) if auto_prepare else model_files(weights, home)
    started = time.perf_counter()
    model = load_llama(files, kernels)
    return LoadedModel(model, Tokenizer(files), files, time.perf_counter() - started)
