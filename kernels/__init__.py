"""Kernel backends behind one interface (`kernels.interface.Kernels`), chosen per device.

`reference` (numpy) is the ground truth and always available; `cpu` (Numba) and `cuda` (CuPy) are
the fast twins, each checked against it op by op. `cpu-bf16-weights` is `cpu` with decode of 1-5
sequences reading bf16 copies of the weights (`CpuKernels(bf16_weights=True)`): twice as fast where
decode waits on memory, at the cost of rounding the weights; chosen by name only.
"""
from __future__ import annotations

from kernels.interface import Kernels

BACKENDS = ("reference", "cpu", "cpu-bf16-weights", "cuda")
BF16_WEIGHTS = "cpu-bf16-weights"
DEVICE_BACKENDS = {"cpu": "cpu", "cuda": "cuda"}


def backend_for_device(device: str, backend: str | None = None) -> str:
    """The backend an instance on `device` ('cpu', 'cpu:1', 'cuda', 'cuda:0') uses, unless one is named."""
    if backend is not None:
        return backend
    kind = device.split(":")[0]
    if kind not in DEVICE_BACKENDS:
        raise ValueError(f"unknown device {device!r}; use cpu, cpu:N, cuda or cuda:N")
    return DEVICE_BACKENDS[kind]


class BackendUnavailable(ValueError):
    """A backend this machine cannot run on the device asked for: its library or the device is missing."""


def check_device(device: str, backend: str | None = None) -> None:
    """Fail in one line, before any weights move, when this machine cannot run `backend` (default:
    the device's own) on `device`, or lacks the device.

    Only CUDA can be missing: a cuda:N device, or the cuda backend, needs CuPy (the `cuda12` or
    `cuda13` extra) and that GPU. CuPy is imported here and nowhere on a CPU-only path.
    """
    chosen = backend_for_device(device, backend)
    kind, _, index = device.partition(":")
    if chosen == "cuda" and kind != "cuda":
        raise BackendUnavailable(f"the cuda backend runs on cuda or cuda:N, not {device!r}")
    if chosen == BF16_WEIGHTS and kind == "cuda":
        raise BackendUnavailable(f"the {BF16_WEIGHTS} backend runs on cpu or cpu:N, not {device!r}")
    if kind != "cuda":
        return
    if not (index or "0").isdigit():
        raise BackendUnavailable(f"bad device {device!r}; write cuda or cuda:N")
    try:
        import cupy
    except ImportError:
        raise BackendUnavailable(f"{device} needs CuPy: pip install -e '.[cuda12]' or '.[cuda13]' "
                                 "(the one matching this machine's CUDA)") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:
        raise BackendUnavailable(f"{device}: CuPy finds no usable CUDA GPU here ({e})") from None
    if int(index or 0) >= count:
        raise BackendUnavailable(f"{device}: this machine has {count} CUDA GPU(s)")


def get_kernels(backend: str = "reference", device: str = "cpu") -> Kernels:
    """Return the backend named `backend`; a clear error names the ones that exist, or says why
    this machine cannot run it."""
    if backend == "reference":
        from kernels.reference import ReferenceKernels
        return ReferenceKernels()
    if backend in ("cpu", BF16_WEIGHTS):
        from kernels.cpu import CpuKernels
        return CpuKernels(bf16_weights=backend == BF16_WEIGHTS)
    if backend == "cuda":
        check_device(device, backend)
        from kernels.gpu import GpuKernels
        return GpuKernels(device)
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


def keeps_bf16_copies(kernels: Kernels) -> bool:
    """Whether instances on this backend keep bf16 copies of their projection weights (the CPU
    backend with a bf16 route, `kernels.bf16`, or reading bf16 weights): memory the scheduler must
    charge them."""
    return getattr(kernels, "bf16", None) is not None or getattr(kernels, "bf16_weights", False)
