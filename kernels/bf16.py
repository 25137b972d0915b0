"""bf16 GEMMs for the steps that multiply many tokens at once (prefill), on whichever bf16 unit
this CPU has: Intel's AMX tiles (`kernels.amx_tiles`) or, without them, AVX512-BF16's dot-product
instruction (`kernels.avx512_bf16`: AMD Zen 4 and later). Both take bf16 inputs and accumulate and
return float32, on the same operand layouts (`kernels.bf16_layout`), several times faster than
float32 BLAS on the same cores.

numpy's OpenBLAS has no bf16 GEMM, and MKL's `cblas_gemm_bf16bf16f32` re-lays out its operands on
every call (docs/benchmarks_cpu_kernels.md; on the Zen 4 VM it ran no faster than float32 BLAS). So
weights are converted to bf16 and laid out once, at their first such GEMM, by one parallel pass
(0.25 s for SmolLM2-135M's 106 M projection weights on the 2-core Zen 4 VM, half of it faulting in
the new pages), and kept beside the float32 original while some instance uses it. The copies are
process-wide and found by the memory a weight views, so the instances loaded from one host-cache
entry (each with its own views and kernels object) share them; weak references to those views drop
a copy with its last user, so an unloaded instance's copies do not outlive it (they are half its
projection weights' bytes, which a budget of host memory must not lose track of). Activations are converted per call (round to nearest even) into the layout by a
parallel Numba pass, which costs a few percent of the GEMM.
The prompt attention's bf16 tiles (`kernels.cpu_attention`) use the same block products.

The route is chosen at run time: AMX where the CPU reports `amx_bf16` and Linux grants the tile
state (5.16 or later), else AVX512-BF16 where the CPU reports `avx512_bf16`. Nothing beyond Numba
is needed; the kernels run on Numba's pool like every other CPU kernel.
"""
from __future__ import annotations

import threading
import weakref
from pathlib import Path

import numba
import numpy as np
from numba import prange

from kernels import avx512_bf16, bf16_gemm
from kernels.amx_instructions import request_tile_permission
from kernels.bf16_layout import TileRows, TileWeight
from kernels.cpu_math import bf16_bits
from kernels.cpu_pool import cpu_info


@numba.njit(parallel=True, nogil=True, cache=True)
def _round_to_bf16(values, out):
    """float32 [n] -> bf16 bit patterns [n] (uint16)."""
    for i in prange(values.shape[0]):
        out[i] = bf16_bits(values[i])


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 array -> same-shape bf16 bit patterns (uint16); widen back with `from_bf16`."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty(flat.shape, np.uint16)
    _round_to_bf16(flat, out)
    return out.reshape(x.shape)


def from_bf16(x: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32, exactly."""
    return (x.astype(np.uint32) << 16).view(np.float32)


def cpu_has_amx_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    return "amx_bf16" in cpu_info("flags", cpuinfo).split()


def amx_unavailable_reason() -> str | None:
    """Why the AMX tiles cannot run here, or None if they can."""
    if not cpu_has_amx_bf16():
        return "this CPU does not report amx_bf16 in /proc/cpuinfo"
    if not request_tile_permission():
        return "Linux refused this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)"
    return None


def unavailable_reason() -> str | None:
    """Why no bf16 route can run here, or None if one can."""
    amx = amx_unavailable_reason()
    if amx is None or avx512_bf16.cpu_has_avx512_bf16():
        return None
    return f"{amx}, nor avx512_bf16"


_TILED: dict[tuple, TileWeight] = {}   # tile_key of a weight -> its bf16 tiles, for the whole process
_USERS: dict[tuple, set[int]] = {}     # tile_key -> id() of each live array that asked for those tiles
_LOCK = threading.Lock()               # device threads may ask at once


def tile_key(weight: np.ndarray, gated: bool = False) -> tuple:
    """What identifies a weight's bf16 copy: the memory it views (address, shape, strides), not the
    array object, as each instance holds its own views of a host-cache entry."""
    return weight.ctypes.data, weight.shape, weight.strides, gated


def tiled_weight(weight: np.ndarray, gated: bool = False) -> TileWeight:
    """The bf16 tile copy of `weight` [O, I] (`gated`: a stacked gate|up, laid out for `swiglu`),
    made on first use and shared by every array viewing the same memory; it lives while one of the
    arrays that asked for it does. The bf16 GEMMs and the bf16-weight GEMVs (`kernels.bf16_gemv`)
    read the same copy."""
    key = tile_key(weight, gated)
    with _LOCK:
        users = _USERS.setdefault(key, set())
        if id(weight) not in users:
            users.add(id(weight))
            weakref.finalize(weight, _forget, key, id(weight))
        cached = _TILED.get(key)
        if cached is None:       # packed under the lock: a second thread waits rather than packs too
            cached = _TILED[key] = TileWeight.pack_gated(weight) if gated else TileWeight.pack(weight)
    return cached


def _forget(key: tuple, user: int) -> None:
    """`user` is gone; with the last one, so is the copy."""
    with _LOCK:
        users = _USERS.get(key, set())
        users.discard(user)
        if not users:
            _USERS.pop(key, None)
            _TILED.pop(key, None)


class Bf16Matmul:
    """`matmul(x, weight)` = x @ weight.T with bf16 inputs, float32 accumulation and output, on
    `route` (`bf16_gemm.AMX` or `bf16_gemm.AVX512_BF16`; by default AMX where granted)."""

    def __init__(self, route: np.ndarray | None = None):
        if route is None:
            route = bf16_gemm.AMX if amx_unavailable_reason() is None else bf16_gemm.AVX512_BF16
        self.route = route

    @property
    def unit(self) -> str:
        """"AMX" or "AVX512-BF16": which unit multiplies."""
        return "AMX" if self.route is bf16_gemm.AMX else "AVX512-BF16"

    @classmethod
    def create(cls, required: bool = False) -> "Bf16Matmul | None":
        """The bf16 route this machine has; else None, or RuntimeError if `required`."""
        reason = unavailable_reason()
        if reason is None:
            return cls()
        if required:
            raise RuntimeError(f"the bf16 GEMM route was asked for but is unavailable: {reason}")
        return None

    def matmul(self, x: np.ndarray | TileRows, weight: np.ndarray) -> np.ndarray:
        """x [T, I] float32 (or already bf16 tiles), weight [O, I] float32 -> [T, O] float32."""
        return bf16_gemm.matmul(self.route, _as_rows(x), tiled_weight(weight))

    def swiglu(self, x: np.ndarray | TileRows, gate_up: np.ndarray) -> TileRows:
        """silu(x @ gate.T) * (x @ up.T), gate_up [2F, I] stacked, as the next GEMM's bf16 tiles."""
        return bf16_gemm.swiglu(self.route, _as_rows(x), tiled_weight(gate_up, gated=True))


def _as_rows(x: np.ndarray | TileRows) -> TileRows:
    return x if isinstance(x, TileRows) else TileRows.convert(x)
