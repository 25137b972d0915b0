"""Prepared weights in the model cache -> a LlamaModel on a backend, plus its tokenizer."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from kernels.interface import Kernels
from kernels.thread_tuner import ThreadCountTuner
from models.llama import LlamaModel
from refengine.engine.tokenizer import Tokenizer
from refengine.store.cache import ModelFiles, is_prepared, model_files
from refengine.store.model_store import ModelStore
from refengine.store.prepare import prepare


@dataclass
class LoadedModel:
    model: LlamaModel
    tokenizer: Tokenizer
    files: ModelFiles
    load_s: float   # reading the checkpoint and moving it to the backend


def ensure_prepared(weights: str, home: Path | None = None, progress: bool = True) -> ModelFiles:
    """The cache entry for `weights`, preparing it first if it is missing or incomplete."""
    if not is_prepared(weights, home):
        return prepare(weights, home=home, progress=progress)
    return model_files(weights, home)


def load_llama(files: ModelFiles, kernels: Kernels, execute_while_load: bool = False) -> LlamaModel:
    """The model's weights from the cache onto `kernels`' device, with no host cache: the loading-
    optimized checkpoint read in parallel chunks into one buffer whose views are the weights.
    execute_while_load: return before the bytes are in; each layer of a forward pass waits for its own."""
    store = ModelStore()
    try:
        load = store.load(files, kernels).load
    finally:
        store.close()
    return with_fast_decode(load.model if execute_while_load else load.wait().model)


def with_fast_decode(model: LlamaModel, tune_threads: bool = True,
                     tuner: ThreadCountTuner | None = None) -> LlamaModel:
    """Small decode steps without a Python call per kernel, which at batch 1 cost more than the
    work between calls: on the CuPy backend they replay captured CUDA graphs (a step is ~350
    launches; 6x at batch 1 on an H200, docs/benchmarks_gpu.md), on the CPU backend they run as one
    parallel region (`kernels.cpu_decode_step`; 1.13x at batch 1 on the Zen 3 VM). Prefills and
    large batches run op by op; the reference backend as it is. On the CPU every step also runs on
    the thread count found fastest for it lately (`kernels.cpu_threads`): fewer threads than cores
    while another process holds a core (unless not `tune_threads`: the latency profile measures the
    quiet machine), learning into `tuner` if given (one shared by the models one thread steps)."""
    name = getattr(model.kernels, "name", None)
    if name == "cuda":
        from kernels.gpu_graph import GraphedDecodeModel
        return GraphedDecodeModel(model)
    if name == "cpu":
        from kernels.cpu_decode_step import CpuDecodeModel
        from kernels.cpu_threads import ThreadTunedModel
        return ThreadTunedModel(CpuDecodeModel(model), tuner) if tune_threads else CpuDecodeModel(model)
    return model


def load_model(weights: str, kernels: Kernels, home: Path | None = None, auto_prepare: bool = True) -> LoadedModel:
    files = ensure_prepared(weights, home) if auto_prepare else model_files(weights, home)
    started = time.perf_counter()
    model = load_llama(files, kernels)
    return LoadedModel(model, Tokenizer(files), files, time.perf_counter() - started)
