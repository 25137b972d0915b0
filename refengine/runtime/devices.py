"""Devices of the live runtime: names, memory budgets, and one worker thread each.

A worker runs its device's jobs one at a time (a granted step, a weight load, a KV resize), so an
instance is only ever touched by its device's thread and two steps never overlap on one device —
SLINFER's "one grant per node" holds physically, not just in the scheduler's books. Kernels release
the GIL (BLAS, Numba nogil, CUDA), so workers of several devices and the asyncio loop run together.

`cpu*2` (or `cpu:0,cpu:1`) splits the CPU into logical devices, each with its own worker and memory
budget, so placement across devices, bin-packing and preemption run for real on a CPU-only machine.
"""
from __future__ import annotations

import queue
import re
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, TypeVar

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.I)
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 1 << 10, "M": 1e6, "MB": 1e6, "MIB": 1 << 20,
          "G": 1e9, "GB": 1e9, "GIB": 1 << 30, "T": 1e12, "TB": 1e12, "TIB": 1 << 40}


def parse_size(text: str) -> int:
    """'8GiB', '512MiB', '2GB', '1048576' -> bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"cannot read size {text!r}; write e.g. 8GiB, 512MiB or a byte count")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def parse_devices(text: str) -> list[str]:
    """'cpu' -> ['cpu:0']; 'cpu*2' -> ['cpu:0', 'cpu:1']; 'cpu,cuda:0' -> ['cpu:0', 'cuda:0']."""
    devices: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, count = part.partition("*")
        if count:
            if not count.isdigit() or int(count) < 1 or ":" in kind:
                raise ValueError(f"bad device {part!r}; write cpu*N with N >= 1")
            devices += [f"{kind}:{i}" for i in range(int(count))]
        else:
            devices.append(part if ":" in part else f"{part}:0")
    for device in devices:
        kind, _, index = device.partition(":")
        if kind not in ("cpu", "cuda") or not index.isdigit():
            raise ValueError(f"unknown device {device!r}; use cpu, cpu*N, cpu:N or cuda:N")
    if not devices or len(set(devices)) != len(devices):
        raise ValueError(f"devices must be a non-empty list without repeats, got {text!r}")
    return devices


@dataclass(frozen=True)
class DeviceSpec:
    name: str            # "cpu:0", "cuda:0"
    memory_bytes: int    # what the scheduler may hand out on it

    @property
    def kind(self) -> str:
        """The scheduler's device kind: "cpu" or "gpu"."""
        return "gpu" if self.name.startswith("cuda") else "cpu"


Job = Callable[[], None]
OnError = Callable[[Exception], None]


class DeviceWorker:
    """A thread that runs jobs for one device in submission order.

    A job that raises does not stop the device: its own `on_error` runs instead, on this thread
    before the next job, because only the submitter knows what the failure touched.
    """

    def __init__(self, spec: DeviceSpec):
        self.spec = spec
        self._jobs: queue.SimpleQueue[tuple[Job, OnError] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"worker-{spec.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job, on_error: OnError) -> None:
        self._jobs.put((job, on_error))

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, on_error = item
            try:
                job()
            except Exception as e:
                on_error(e)


T = TypeVar("T")


def relay(source: DeviceWorker, dest: DeviceWorker, produce: Callable[[], T],
          consume: Callable[[T | None], None], on_source_error: OnError, on_dest_error: OnError) -> None:
    """Run `produce` on `source`'s thread and `consume` on `dest`'s with what it returned (None if it
    raised; the error goes to `on_source_error`). The consumer is queued on `dest` now, ahead of
    any job submitted there later, and waits for the producer (a live migration's hand-over: the
    destination takes over what the source lets go, before its next step). Producers never wait
    and a consumer waits only for a producer queued before it, so no two devices wait for each other.
    """
    produced: Future = Future()

    def producer() -> None:
        value = None
        try:
            value = produce()
        finally:
            produced.set_result(value)

    source.submit(producer, on_source_error)
    dest.submit(lambda: consume(produced.result()), on_dest_error)
