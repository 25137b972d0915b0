"""One load of a packed model onto one device: disk → host buffer → device, chunk by chunk.

The model object exists before its bytes do: every weight is a view of one preallocated buffer (the
host buffer on a CPU backend, one device buffer on a GPU), and `PartArrival` says which parts have
landed. So a caller may run the model at once (execute-while-load: each layer waits for its own
weights) or `wait()` for all of it. Chunks are read by the store's thread pool in file order and
handed to the device target as each one is in (and has passed its checksum, on first use).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Protocol

import numpy as np

from kernels.interface import Array, Kernels
from models.config import LlamaConfig
from models.llama import LlamaModel, LlamaWeights, Resident
from refengine.store.arrival import PartArrival
from refengine.store.cache import PREPARE_HINT, ModelCacheError, ModelFiles
from refengine.store.chunked_read import FileReader, read_chunks
from refengine.store.packed import PackedIndex, mark_verified


class DeviceTarget(Protocol):
    """Where a model's bytes end up: it owns the device buffer and reports each chunk as resident."""

    def arrays(self, index: PackedIndex, host: np.ndarray) -> dict[str, Array]: ...
    def land(self, chunk: int, offset: int, nbytes: int, arrival: PartArrival) -> None: ...
    def close(self) -> None: ...


class HostViews:
    """CPU backends: the host buffer is the device memory, so the weights are views of it and a chunk
    is resident as soon as it is read. Pinning the host-cache entry while the model lives is the
    store's job."""

    def __init__(self, kernels: Kernels):
        self.kernels = kernels

    def arrays(self, index: PackedIndex, host: np.ndarray) -> dict[str, Array]:
        arrays = {}
        for name, view in index.views(host).items():
            arrays[name] = self.kernels.asarray(view)
            if not np.shares_memory(arrays[name], view):
                raise TypeError(f"{self.kernels.name} backend copies host arrays in asarray; give it a device target")
        return arrays

    def land(self, chunk: int, offset: int, nbytes: int, arrival: PartArrival) -> None:
        arrival.landed(chunk)

    def close(self) -> None:
        pass


def device_target(kernels: Kernels) -> DeviceTarget:
    """The target for a backend: views of host memory, or a pipelined upload to its GPU."""
    if kernels.name == "cuda":
        from refengine.store.cuda_upload import CudaUpload
        return CudaUpload(kernels.device)
    return HostViews(kernels)


class ModelLoad:
    """The bytes of one packed model on their way to one device; `model` is usable at once."""

    def __init__(self, files: ModelFiles, index: PackedIndex, host: np.ndarray, target: DeviceTarget,
                 config: LlamaConfig, kernels: Kernels,
                 on_complete: Callable[[BaseException | None], None] | None = None):
        """on_complete(error) runs once when every chunk is resident or the load failed, before `wait` returns."""
        self.files, self.index, self.host, self.target = files, index, host, target
        self.source = ""              # the tier the bytes came from: "disk" or "host"
        self.started = time.perf_counter()
        self.read_done: float | None = None
        self.finished: float | None = None
        self._on_complete = on_complete
        self._verify = False
        self._reader: FileReader | None = None
        self._reads: list[Future] = []
        self._lock = threading.Lock()
        self._chunks_read = 0
        self._reads_finished = 0
        self.arrival = PartArrival(index, self._complete)
        self.model = LlamaModel(config, LlamaWeights.from_arrays(target.arrays(index, host), config, self.arrival),
                                kernels)

    def from_disk(self, pool: Executor, verify: bool, direct: bool) -> "ModelLoad":
        """Read the data file into the host buffer on `pool`, checking chunk checksums if `verify`."""
        self.source, self._verify = "disk", verify
        self._reader = FileReader(self.files.packed, direct=direct)
        self._reads = read_chunks(self._reader, self.host, self.index.chunks, pool, self._chunk_read)
        for future in self._reads:
            future.add_done_callback(self._read_finished)
        return self

    def from_host(self) -> "ModelLoad":
        """The host buffer is already complete (the host cache): only the device copy remains."""
        self.source, self.read_done = "host", self.started
        for i, (offset, nbytes) in enumerate(self.index.chunks):
            self.target.land(i, offset, nbytes, self.arrival)
        return self

    def wait(self) -> "ModelLoad":
        """Block until every weight is resident; raise the load's error if it failed."""
        self.arrival.wait_all()
        return self

    # the observed time of each tier, from which a startup estimate can learn its bandwidths
    @property
    def read_s(self) -> float:
        """Seconds until the last byte was in host memory (0 from the host cache)."""
        return (self.read_done or self.started) - self.started

    @property
    def load_s(self) -> float:
        """Seconds until the last byte was resident on the device."""
        return (self.finished or self.started) - self.started

    def _chunk_read(self, i: int) -> None:
        offset, nbytes = self.index.chunks[i]
        if self._verify:
            self.index.check_chunk(self.files.packed, i, self.host[offset:offset + nbytes])
        with self._lock:
            self._chunks_read += 1
            if self._chunks_read == len(self.index.chunks):
                self.read_done = time.perf_counter()
        self.target.land(i, offset, nbytes, self.arrival)

    def _read_finished(self, future: Future) -> None:
        """A read task ended: report its error, and close the file after the last one."""
        error = None if future.cancelled() else future.exception()
        if error is not None:
            if isinstance(error, (EOFError, OSError)):
                error = ModelCacheError(f"cannot read {self.files.packed}: {error}; {PREPARE_HINT}")
            for other in self._reads:
                other.cancel()      # the reads not started yet are wasted work now
            self.arrival.fail(error)
        with self._lock:
            self._reads_finished += 1
            last = self._reads_finished == len(self.index.chunks)
        if last:
            self._reader.close()
            self._reads = []      # their callbacks point back here: let the buffer go with the model

    def _complete(self, error: BaseException | None) -> None:
        self.finished = time.perf_counter()
        self.target.close()
        if error is None:
            self.model.weights.arrival = Resident()    # every later step skips the waits
            if self._verify:
                mark_verified(self.files)
        if self._on_complete is not None:
            self._on_complete(error)
