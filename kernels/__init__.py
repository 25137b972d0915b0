"""Kernel backends behind one interface (`kernels.interface.Kernels`), chosen per device.

`reference` (numpy) is the ground truth and always available; `cpu` (Numba) and `cuda` (CuPy) are
the fast twins, each checked against it op by op.
"""
from __future__ import annotations

from kernels.interface import Kernels

BACKENDS = ("reference", "cpu", "cuda")
DEVICE_BACKENDS = {"cpu": "cpu", "cuda": "cuda"}


def backend_for_device(device: str, backend: str | None = None) -> str:
    """The backend an instance on `device` ('cpu', 'cpu:1', 'cuda', 'cuda:0') uses, unless one is named."""
    if backend is not None:
        return backend
    kind = device.split(":")[0]
    if kind not in DEVICE_BACKENDS:
        raise ValueError(f"unknown device {device!r}; use cpu, cpu:N, cuda or cuda:N")
    return DEVICE_BACKENDS[kind]


def get_kernels(backend: str = "reference", device: str = "cpu") -> Kernels:
    """Return the backend named `backend`; a clear error names the ones that exist."""
    if backend == "reference":
        from kernels.reference import ReferenceKernels
        return ReferenceKernels()
    if backend == "cpu":
        from kernels.cpu import CpuKernels
        return CpuKernels()
    if backend == "cuda":
        from kernels.gpu import GpuKernels
        return GpuKernels(device)
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
