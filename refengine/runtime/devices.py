"""Devices of the live runtime: names, memory budgets, and one worker thread each.

Device names are `cpu`, `cpu:N` and `cuda:N` (the serve command parses the flags).

A worker runs its device's jobs one at a time (a granted step, a weight load, a KV resize), so an
instance is only ever touched by its device's thread and two steps never overlap on one device —
SLINFER's "one grant per node" holds physically, not just in the scheduler's books. Kernels release
the GIL (BLAS, Numba nogil, CUDA), so workers of several devices and the asyncio loop run together.

`cpu*2` (or `cpu:0,cpu:1`) splits the CPU into logical devices, each with its own worker and memory
budget, so placement across devices, bin-packing and preemption run for real on a CPU-only machine.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable

@dataclass(frozen=True)
class DeviceSpec:
    name: str            # "cpu", "cpu:1", "cuda:0"
    memory_bytes: int    # what the scheduler may hand out on it


    @property
    def kind(self) -> str:
        """The scheduler's device kind: "cpu" or "gpu"."""
        return "gpu" if self.name.startswith("cuda") else "cpu"

    @property
    def default_memory(self) -> int:
        """The budget when none is given: 8 GiB per CPU device, 40 GiB per GPU (head-room left)."""
        return (40 << 30) if self.kind == "gpu" else (8 << 30)


class DeviceWorker:
    """A thread that runs jobs for one device in submission order."""

    def __init__(self, spec: DeviceSpec, on_error: Callable[[BaseException], None]):
        self.spec = spec
        self.on_error = on_error
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"worker-{spec.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException as e:   # a failed job must not kill the device; the runtime decides
                self.on_error(e)
