"""The multi-tier model store: disk → host-memory cache → device, and which tier holds each model.

ServerlessLLM keeps checkpoints on the serving machines and makes the local copy fast: a loading-
optimized format on disk (`packed.py`), a DRAM cache of whole models with LRU and pinning
(`host_cache.py`), parallel chunked direct-I/O reads (`chunked_read.py`) pipelined into the device
(`model_load.py`). Its scheduler picks placements by estimated startup time, which needs to know
where each model is now: `residency(weights)` answers that with a tier and the bytes a load moves.

`load` returns at once with a `Lease` whose model may already run (execute-while-load); the caller
holds it until the model leaves the device and then `release`s it. On a CPU backend the
model's weights are views of the host-cache entry, so that entry stays pinned until the release; on
a GPU the device has its own copy and the host entry is unpinned as soon as the copy is done.
"""
from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels.interface import Kernels
from models.config import LlamaConfig
from models.llama import LlamaModel
from refengine.store.cache import ModelFiles, model_files, verify
from refengine.store.chunked_read import aligned_empty
from refengine.store.host_cache import HostCache
from refengine.store.model_load import HostViews, ModelLoad, device_target
from refengine.store.packed import PackedIndex, is_verified, read_index

DISK, HOST, DEVICE = "disk", "host", "device"
READ_THREADS = 4     # ServerlessLLM: about 4 threads saturate an NVMe RAID; more only contend on 2 cores


@dataclass(frozen=True)
class Residency:
    """Where one model's weights are, for a startup-time estimate (queue + nbytes ÷ tier bandwidth)."""

    tier: str                    # DEVICE, HOST or DISK: the fastest tier holding a complete copy
    nbytes: int                  # bytes a load moves (the packed checkpoint)
    devices: tuple[str, ...]     # the devices it is loaded on


@dataclass
class Lease:
    """One model on one device, taken from the store; `release` it (or leave its `with`) when the
    model leaves the device."""

    store: "ModelStore"
    weights: str
    device: str
    load: ModelLoad
    pins_host: bool              # the model's weights are views of a host-cache entry (CPU)

    @property
    def model(self) -> LlamaModel:
        return self.load.model

    def release(self) -> None:
        self.store.release(self)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ModelStore:
    """The tiers of one machine: the model cache on disk, one host cache, the devices it loads onto."""

    def __init__(self, home: Path | None = None, host_budget: int = 0, threads: int = READ_THREADS,
                 direct: bool = True, allocate: Callable[[int], np.ndarray] = aligned_empty):
        """host_budget: bytes of the host cache (0 = no host tier). allocate: how host buffers are
        made; `cuda_upload.pinned_empty` when models go to a GPU."""
        self.home = home
        self.direct = direct
        self.host = HostCache(host_budget, allocate)
        self._allocate = allocate
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="store-read")
        self._lock = threading.Lock()
        self._filling: dict[str, Future] = {}                    # weights -> done once its entry is filled
        self._on_devices: Counter[tuple[str, str]] = Counter()   # (weights, device) -> leases held

    # ---------------------------------------------------------------- what the scheduler asks
    def residency(self, weights: str) -> Residency:
        """The fastest tier holding `weights` and the bytes a load of it moves."""
        with self._lock:
            devices = tuple(sorted(device for (w, device), n in self._on_devices.items() if w == weights and n))
        tier = DEVICE if devices else HOST if self.host.holds(weights) else DISK
        return Residency(tier, model_files(weights, self.home).packed.stat().st_size, devices)

    # ---------------------------------------------------------------- loading
    def load(self, files: ModelFiles, kernels: Kernels, device: str = "cpu") -> Lease:
        """Start loading a prepared model onto `kernels`' device through the tiers. The lease's model
        runs at once, each layer waiting for its own bytes; `lease.load.wait()` waits for all of them."""
        weights = files.dir.name
        verify(files)
        index = read_index(files)
        config = LlamaConfig.from_json(files.config)
        target = device_target(kernels)
        keeps_host = isinstance(target, HostViews)
        host, from_disk = self._host_buffer(weights, index)
        cached = host is not None
        if host is None:
            host = self._allocate(index.size)    # no room in the cache now: a private buffer, freed with the model

        def complete(error: BaseException | None) -> None:
            """Settle the host-cache entry once the load has ended."""
            if not cached:
                return
            if from_disk:
                self._filled(weights, error)     # complete the entry, or drop it (pin and all) after a failure
                if error is not None:
                    return
            if error is not None or not keeps_host:
                self.host.release(weights)       # a GPU has its own copy now; a failed copy needs no pin

        try:
            load = ModelLoad(files, index, host, target, config, kernels, complete)
        except BaseException as e:
            complete(e)
            raise
        try:
            if from_disk:
                load.from_disk(self._pool, verify=not is_verified(files), direct=self.direct)
            else:
                load.from_host()
        except BaseException as e:
            load.arrival.fail(e)
            raise
        with self._lock:
            self._on_devices[weights, device] += 1
        return Lease(self, weights, device, load, pins_host=cached and keeps_host)

    def release(self, lease: Lease) -> None:
        """The model left its device: forget the device copy and unpin its host entry. A load still
        in flight is waited for first (its reader threads are filling that entry)."""
        with self._lock:
            self._on_devices[lease.weights, lease.device] -= 1
        try:
            lease.load.wait()
        except Exception:
            return           # a failed load has already dropped its pin
        if lease.pins_host:
            self.host.release(lease.weights)

    def close(self) -> None:
        """No more loads; the reads of loads in flight still finish."""
        self._pool.shutdown(wait=False)

    # ---------------------------------------------------------------- the host tier
    def _host_buffer(self, weights: str, index: PackedIndex) -> tuple[np.ndarray | None, bool]:
        """(buffer, must it be read from disk): the cached copy pinned, else a new pinned cache
        entry to fill, else (None, True) when the cache has no room. A fill in flight is waited for."""
        while True:
            with self._lock:
                filling = self._filling.get(weights)
                if filling is None:
                    host = self.host.acquire(weights)
                    if host is not None:
                        return host, False
                    host = self.host.admit(weights, index.size)
                    if host is not None:
                        self._filling[weights] = Future()
                    return host, True
            filling.result()

    def _filled(self, weights: str, error: BaseException | None) -> None:
        with self._lock:
            if error is None:
                self.host.complete(weights)
            else:
                self.host.discard(weights)
            self._filling.pop(weights).set_result(None)
