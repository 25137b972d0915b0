"""The GPU end of a load: one device buffer, filled chunk by chunk from pinned host memory.

ServerlessLLM §3: pinned host buffers let the copy engine DMA straight from the chunk a reader
thread just filled, and pipelining means the host→device copy of chunk i runs while the readers
fetch chunk i+1. Here one uploader thread per load takes chunks in the order they were read and
queues their copies on a private stream back to back, recording an event after each; a second
thread waits on those events in order and reports each chunk resident once its copy is done, so
the forward pass (execute-while-load) never reads a byte early, whatever stream it computes on.
(Waiting on each copy before queueing the next, as this did first, left the copy engine idle for
a queue hand-off per 16 MiB chunk; with ~180 three-call CuPy views built before the first copy,
the host-cache → H200 load ran at 70% of the pinned-copy limit.)
CuPy is imported when the first GPU load starts; CPU-only machines never import it.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import numpy as np

from kernels.interface import Array
from refengine.store.arrival import PartArrival
from refengine.store.packed import PackedIndex

_HOST_TO_DEVICE = 1    # cudaMemcpyHostToDevice


def pinned_empty(nbytes: int) -> np.ndarray:
    """A flat uint8 host buffer in page-locked memory (page-aligned, so O_DIRECT reads fill it too)."""
    import cupy
    memory = cupy.cuda.alloc_pinned_memory(nbytes)
    return np.frombuffer(memory, dtype=np.uint8, count=nbytes)


def pinned_copy(nbytes: int, device: str) -> Callable[[], None]:
    """A function that copies `nbytes` from page-locked host memory to `device` ("cuda:N") and waits:
    the host→device limit, as benchmarks and the runtime's start-up measure it."""
    import cupy
    host = pinned_empty(nbytes)
    host.fill(1)
    gpu = cupy.cuda.Device(int(device.partition(":")[2] or 0))
    with gpu:
        dst = cupy.empty(nbytes, dtype=cupy.uint8)

    def copy() -> None:
        with gpu:
            dst.set(host)
            cupy.cuda.runtime.deviceSynchronize()

    return copy


class CudaUpload:
    """A `DeviceTarget` for one GPU (a `cupy.cuda.Device`)."""

    def __init__(self, device):
        import cupy
        self._cupy = cupy
        self.device = device
        self._queue: queue.Queue[tuple[int, int, int, PartArrival] | None] = queue.Queue()
        self._copied: queue.Queue[tuple[object, int, PartArrival] | None] = queue.Queue()
        self._host: np.ndarray | None = None
        self._buffer = None

    def arrays(self, index: PackedIndex, host: np.ndarray) -> dict[str, Array]:
        """Views of one device buffer the size of the file, each made by one array constructor (a
        slice, a dtype view and a reshape cost three); the uploader threads start here."""
        cupy = self._cupy
        with self.device:
            self._buffer = cupy.empty(index.size, dtype=cupy.uint8)
        self._host = host
        for work, name in ((self._upload, "cuda-upload"), (self._confirm, "cuda-upload-done")):
            threading.Thread(target=work, name=name, daemon=True).start()
        base = self._buffer.data
        return {name: cupy.ndarray(e.shape, dtype=e.dtype, memptr=base + e.offset)
                for name, e in index.tensors.items()}

    def land(self, chunk: int, offset: int, nbytes: int, arrival: PartArrival) -> None:
        self._queue.put((chunk, offset, nbytes, arrival))

    def close(self) -> None:
        """Stop the uploader once the queued copies are done (a failed load stops it early too)."""
        self._queue.put(None)

    def _upload(self) -> None:
        """Queue each chunk's copy as soon as it is in host memory, and pass its event on."""
        runtime = self._cupy.cuda.runtime
        with self.device:
            stream = self._cupy.cuda.Stream(non_blocking=True)
            while (item := self._queue.get()) is not None:
                chunk, offset, nbytes, arrival = item
                try:
                    runtime.memcpyAsync(self._buffer.data.ptr + offset, self._host.ctypes.data + offset, nbytes,
                                        _HOST_TO_DEVICE, stream.ptr)
                    self._copied.put((stream.record(), chunk, arrival))
                except Exception as e:   # a CUDA error ends the load; the waiters see it
                    arrival.fail(e)
                    break
        self._copied.put(None)

    def _confirm(self) -> None:
        """Report chunks resident in copy order, each once its event has completed."""
        with self.device:
            while (item := self._copied.get()) is not None:
                event, chunk, arrival = item
                try:
                    event.synchronize()
                except Exception as e:
                    arrival.fail(e)
                    return
                arrival.landed(chunk)
