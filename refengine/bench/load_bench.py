"""How fast each tier of the model store delivers a model, beside the limits of this machine measured
in the same run and the other ways of loading the same weights (ServerlessLLM §3 compares against
safetensors and PyTorch; here the baselines are safetensors and the shipped GGUF).

Every disk figure starts from a dropped page cache: `posix_fadvise(DONTNEED)` on the file read next
(this file only: other processes sharing the machine keep theirs). Times are medians.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kernels.interface import Kernels
from models.config import LlamaConfig
from models.llama import LlamaModel, LlamaWeights
from refengine.store.cache import ModelFiles
from refengine.store.chunked_read import FileReader, aligned_empty, drop_page_cache, read_chunks
from refengine.store.model_store import ModelStore
from refengine.store.packed import CHUNK_BYTES

Case = tuple[Callable[[], object], Callable[[], object] | None]   # (timed run, untimed preparation)


def medians(cases: Mapping[str, Case], repeats: int) -> dict[str, float]:
    """Median wall time of each case's run, each preceded by its untimed preparation (dropping a
    page cache). Cases take turns, so a neighbour's burst of work on a shared machine hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (run, before) in cases.items():
            if before is not None:
                before()
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


# ---------------------------------------------------------------- the limits
def sequential_read_cases(path: Path) -> dict[str, Case]:
    """The disk's sequential read of `path` into memory, dd-like (one thread of 16 MiB reads, buffered
    or O_DIRECT) and fio-like (4 threads of 16 MiB O_DIRECT reads); the best of them is the limit.
    The buffer is touched beforehand, so page faults are not charged to the disk."""
    nbytes = path.stat().st_size
    buffer = aligned_empty(nbytes)
    buffer.fill(0)
    chunks = [(offset, min(CHUNK_BYTES, nbytes - offset)) for offset in range(0, nbytes, CHUNK_BYTES)]

    def case(direct: bool, threads: int) -> Case:
        def read() -> None:
            with FileReader(path, direct=direct) as reader, ThreadPoolExecutor(threads) as pool:
                for future in read_chunks(reader, buffer, chunks, pool, lambda i: None):
                    future.result()
        return read, lambda: drop_page_cache(path)

    return {"dd-like, buffered": case(False, 1), "dd-like, O_DIRECT": case(True, 1),
            "fio-like, 4 threads O_DIRECT": case(True, 4)}


def memcpy_case(nbytes: int) -> Case:
    """One host memory copy of `nbytes` (source and destination touched beforehand)."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros_like(src)
    return (lambda: np.copyto(dst, src)), None


def pinned_h2d_case(nbytes: int, device: str) -> Case:
    """One host→device copy of `nbytes` from page-locked memory."""
    from refengine.store.cuda_upload import pinned_copy
    return pinned_copy(nbytes, device), None


# ---------------------------------------------------------------- the store
def store_disk_case(store: ModelStore, files: ModelFiles, kernels: Kernels, device: str) -> Case:
    """Disk → host → device through the store: page cache dropped, the model not in the host cache."""
    def load() -> None:
        with store.load(files, kernels, device) as lease:
            lease.load.wait()

    def make_cold() -> None:
        store.host.discard(files.dir.name)
        drop_page_cache(files.packed)

    return load, make_cold


def store_host_case(store: ModelStore, files: ModelFiles, kernels: Kernels, device: str) -> Case:
    """Host cache → device: the model is in the store's host cache before each load."""
    def load() -> None:
        with store.load(files, kernels, device) as lease:
            lease.load.wait()

    return load, lambda: None if store.host.holds(files.dir.name) else load()


# ---------------------------------------------------------------- the baselines
def safetensors_model(files: ModelFiles, kernels: Kernels) -> LlamaModel:
    """`safe_open` + one `get_tensor` per tensor, then stacking into the engine's layout."""
    from safetensors import safe_open
    config = LlamaConfig.from_json(files.config)
    with safe_open(files.weights, framework="np") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return LlamaModel(config, LlamaWeights.from_hf(tensors, config, kernels), kernels)


def safetensors_case(files: ModelFiles, kernels: Kernels) -> Case:
    return (lambda: safetensors_model(files, kernels)), lambda: drop_page_cache(files.weights)


def gguf_case(gguf: Path, files: ModelFiles, kernels: Kernels) -> Case:
    """The shipped GGUF: gguf reader, dequantize (Q4_1 → float32) and un-permute, then stacking."""
    from gguf import GGUFReader
    from refengine.store.convert import hf_tensors
    config = LlamaConfig.from_json(files.config)
    return (lambda: LlamaWeights.from_hf(dict(hf_tensors(GGUFReader(gguf))), config, kernels)), \
        lambda: drop_page_cache(gguf)
