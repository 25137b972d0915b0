"""One thread pool for every parallel region of a CPU step: Numba's OpenMP workers.

Why: numpy's OpenBLAS keeps a worker pool of its own that spin-waits after each call, and OpenMP's
workers spin too by default; on two cores the pools preempt each other, and beside any other busy
process a step collapses (a 0.3 ms GEMM took 36 ms; a SmolLM2 decode step went from ~60 ms to 5 s).
So here:
- idle workers spin briefly, then sleep (`kernels.cpu_target`);
- a GEMM is a `prange` over slices of its output (rows or columns, whichever are more), each slice
  one single-threaded BLAS call: float32 from MKL on an Intel CPU where the `mkl` wheel is installed
  (the `amx` extra), else from the OpenBLAS inside numpy's wheel (bf16 runs on `kernels.amx_tiles`).
  MKL's sequential sgemm is 1.2-1.6x OpenBLAS's from 32 rows on the AMX Xeon of
  docs/benchmarks_cpu_kernels.md (float32 prefill +20%); on AMD CPUs MKL is not known to win, so
  there OpenBLAS stays;

Side effect, by design: importing this module makes numpy's OpenBLAS single-threaded for the whole
process (the reference backend's GEMMs in the same process run on one core).
"""
from __future__ import annotations

import ctypes
import functools
from importlib import metadata
from pathlib import Path

import numba
import numpy as np
from numba import prange

from kernels import cpu_target  # noqa: F401  (sets Numba up before the kernels below compile)
from kernels.cpu_threads import POOL_THREADS

CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS = 101, 111, 112
_MKL_THREADING_SEQUENTIAL = 1


def cblas_gemm_argtypes(int_type) -> list:
    """cblas_?gemm(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc); pointers
    travel as integers (addresses from `ndarray.ctypes.data`)."""
    i, f, p = int_type, ctypes.c_float, ctypes.c_size_t
    return [ctypes.c_int] * 3 + [i] * 3 + [f, p, i, p, i, f, p, i]


def _load_openblas_sgemm():
    """`cblas_sgemm` of the OpenBLAS inside numpy's wheel (ILP64, symbols suffixed `64_`), made
    single-threaded; None if numpy was built against another BLAS (then numpy's `@` is used)."""
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for path in sorted(libs.glob("libscipy_openblas64_*.so*")):
        lib = ctypes.CDLL(str(path))
        lib.scipy_openblas_set_num_threads64_(ctypes.c_int(1))
        sgemm = lib.scipy_cblas_sgemm64_
        sgemm.restype, sgemm.argtypes = None, cblas_gemm_argtypes(ctypes.c_int64)
        return sgemm
    return None


def find_mkl_rt() -> Path | None:
    """libmkl_rt.so* from the installed `mkl` wheel (it puts its libraries under <prefix>/lib)."""
    try:
        files = metadata.distribution("mkl").files or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.startswith("libmkl_rt.so"):
            return Path(file.locate()).resolve()
    return None


@functools.cache
def mkl_library() -> ctypes.CDLL | None:
    """MKL's runtime, set to its sequential threading layer (before any MKL call, as MKL requires),
    or None if the `mkl` wheel is not installed."""
    path = find_mkl_rt()
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    lib.MKL_Set_Threading_Layer(_MKL_THREADING_SEQUENTIAL)
    return lib


def cpu_info(field: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first core's `field` in /proc/cpuinfo ("model name", "vendor_id", "flags"), "" if absent."""
    try:
        return next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.split(":", 1)[0].strip() == field), "")
    except OSError:
        return ""


def cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    return cpu_info("vendor_id", cpuinfo)


def _load_mkl_sgemm():
    """MKL's `cblas_sgemm` (LP64) on an Intel CPU with the `mkl` wheel installed, else None."""
    lib = mkl_library() if cpu_vendor() == "GenuineIntel" else None
    if lib is None:
        return None
    sgemm = lib.cblas_sgemm
    sgemm.restype, sgemm.argtypes = None, cblas_gemm_argtypes(ctypes.c_int)
    return sgemm


MKL_SGEMM = _load_mkl_sgemm()
SGEMM = MKL_SGEMM or _load_openblas_sgemm()


@numba.njit(parallel=True, nogil=True, cache=True)
def _sliced_gemm(gemm, batch, rows, cols, inner, a, lda, a_step, a_bytes, b, ldb, b_step, b_bytes, c, ldc, c_step,
                 slices):
    """c[i] = a[i] @ b[i].T for i < batch (a[i] [rows, inner], b[i] [cols, inner], c[i] [rows, cols]
    float32) as batch * slices BLAS calls, each on a range of the longer of c's two dimensions.
    a, b, c are addresses; ld* row strides in elements; *_step batch strides in bytes; *_bytes
    element sizes."""
    split_rows = rows > cols
    length = rows if split_rows else cols
    width = -(-length // slices)
    for item in prange(batch * slices):
        i, lo = item // slices, (item % slices) * width
        n = min(length - lo, width)
        a_i, b_i, c_i = a + i * a_step, b + i * b_step, c + i * c_step
        if n > 0 and split_rows:
            gemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, n, cols, inner, np.float32(1.0),
                 a_i + lo * lda * a_bytes, lda, b_i, ldb, np.float32(0.0), c_i + lo * ldc * 4, ldc)
        elif n > 0:
            gemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, rows, n, inner, np.float32(1.0), a_i, lda,
                 b_i + lo * ldb * b_bytes, ldb, np.float32(0.0), c_i + lo * 4, ldc)


def _blas_rows(x: np.ndarray) -> tuple[np.ndarray, int]:
    """x itself and its row stride in elements if BLAS can read each matrix of it in place, else a
    C-contiguous copy."""
    ld, rem = divmod(x.strides[-2], x.itemsize)
    if x.strides[-1] != x.itemsize or rem or ld < x.shape[-1] or x.strides[0] % x.itemsize:
        x = np.ascontiguousarray(x)
        ld = x.shape[-1]
    return x, ld


def gemm_nt(a: np.ndarray, b: np.ndarray, gemm=None, out: np.ndarray | None = None) -> np.ndarray:
    """a [M, K] @ b [N, K].T -> float32 [M, N], or the same for each matrix of a batch (a [Bt, M, K],
    b [Bt, N, K], out [Bt, M, N]), all slices of all matrices in one parallel region.

    `gemm` is a cblas-style function whose operands are a's and b's dtype (default: float32 sgemm);
    rows of a and b may be strided (slices of a larger array); other layouts are copied first; out,
    if given, must be C-contiguous.
    """
    gemm = gemm or SGEMM
    if gemm is None:
        return np.matmul(a, b.swapaxes(-1, -2), out=out)
    *batch, rows, inner = a.shape
    cols = b.shape[-2]
    if b.shape[-1] != inner or list(b.shape[:-2]) != batch:
        raise ValueError(f"cannot multiply {list(a.shape)} by {list(b.shape)} transposed")
    if out is None:
        out = np.empty((*batch, rows, cols), np.float32)
    if rows and cols and inner:
        (a3, lda), (b3, ldb) = _blas_rows(a.reshape(-1, rows, inner)), _blas_rows(b.reshape(-1, cols, inner))
        c3 = out.reshape(-1, rows, cols)
        _sliced_gemm(gemm, len(c3), rows, cols, inner, a3.ctypes.data, lda, a3.strides[0], a3.itemsize,
                     b3.ctypes.data, ldb, b3.strides[0], b3.itemsize, c3.ctypes.data, cols, c3.strides[0],
                     POOL_THREADS)
    else:
        out[...] = 0.0
    return out
