"""The live runtime's side of the model store: tier bandwidths measured at start-up, and tier reports.

ServerlessLLM's startup-time-aware placement (§5.1) estimates a cold start as queue + bytes ÷ the
bandwidth of the tier holding the model, so the scheduler needs two things from this machine:

- `LoadBandwidths` per device, *measured* when the server starts: disk → host is the first read of
  each checkpoint into the host tier (direct I/O where the file system allows it, into a fresh
  buffer, as a cold load from disk would be); host → device is a load from the host cache through
  the store (on a CPU the weights are views of the entry, so it costs milliseconds; on a GPU it is
  the pipelined pinned upload);
- which tier holds each model, reported as `ModelTierChanged` whenever the host cache gains or
  loses a model (a load fills an entry; a later load may evict one to make room).
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable

import numpy as np

from kernels import get_kernels
from kernels.interface import Kernels
from models.catalogue import Catalogue
from refengine.runtime.devices import DeviceSpec
from refengine.store.cache import ModelFiles
from refengine.store.chunked_read import aligned_empty
from refengine.store.model_store import ModelStore
from scheduler.events import ModelTierChanged
from scheduler.specs import LoadBandwidths

HOST = "localhost"          # the one machine whose disk and host cache feed every device here
H2D_PROBE_BYTES = 256 << 20


def host_allocator(devices: Iterable[DeviceSpec]) -> Callable[[int], np.ndarray]:
    """Page-locked host buffers when a GPU is served (its uploads DMA straight from them), page-
    aligned ones otherwise (CuPy is imported only on a machine that serves a GPU)."""
    if any(d.kind == "gpu" for d in devices):
        from refengine.store.cuda_upload import pinned_empty
        return pinned_empty
    return aligned_empty


def measure_disk_to_host(store: ModelStore, files: Iterable[ModelFiles]) -> float:
    """Bytes/s of reading each checkpoint into the host tier, the entries left there (LRU) for the
    first cold starts. Loads from the host cache read nothing and are not counted."""
    nbytes, seconds = 0, 0.0
    for f in files:
        with store.load(f, get_kernels("reference", "cpu")) as lease:
            load = lease.load.wait()
            if load.source == "disk":
                nbytes, seconds = nbytes + load.index.size, seconds + load.read_s
    return nbytes / seconds if seconds > 0 else math.inf


def measure_host_to_device(store: ModelStore, files: Iterable[ModelFiles], device: DeviceSpec, kernels: Kernels,
                           repeats: int = 3) -> float:
    """Bytes/s of loading a checkpoint the host cache holds onto `device` through the store (the
    median of `repeats`): the views of the entry on a CPU, the pipelined pinned upload on a GPU.
    Without a host tier a CPU load is in place behind the disk read (inf), and a GPU is probed with a
    pinned copy."""
    files = next((f for f in files if store.host.holds(f.dir.name)), None)
    if files is None:
        if device.kind == "cpu":
            return math.inf
        from refengine.store.cuda_upload import pinned_copy
        load, nbytes = pinned_copy(H2D_PROBE_BYTES, device.name), H2D_PROBE_BYTES
    else:
        def load() -> None:
            with store.load(files, kernels, device.name) as lease:
                lease.load.wait()
        nbytes = files.packed.stat().st_size
    load()                                   # first touch and context set-up are not bandwidth
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        load()
        times.append(time.perf_counter() - started)
    return nbytes / statistics.median(times)


def describe(bandwidths: LoadBandwidths) -> str:
    """'disk -> host 2.1 GB/s, host -> device in place' for the start-up log."""
    def rate(bps: float) -> str:
        return "in place" if math.isinf(bps) else f"{bps / 1e9:.1f} GB/s"
    return f"disk -> host {rate(bandwidths.disk_to_host)}, host -> device {rate(bandwidths.host_to_device)}"


class TierReports:
    """Turns the host cache's contents into `ModelTierChanged` events, one per served name whose
    weights entered or left the host tier since the last call (every name starts on "disk")."""

    def __init__(self, store: ModelStore, catalogue: Catalogue, host: str = HOST):
        self.store, self.catalogue, self.host = store, catalogue, host
        self._in_host: set[str] = set()

    def changes(self) -> list[ModelTierChanged]:
        cached = {w for w in self.catalogue.weights if self.store.host.holds(w)}
        moved, self._in_host = cached ^ self._in_host, cached
        return [ModelTierChanged(self.host, name, "host" if weights in cached else "disk")
                for name in self.catalogue.names
                if (weights := self.catalogue[name].weights) in moved]
