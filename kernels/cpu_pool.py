"""One thread pool for every parallel region of a CPU step: Numba's OpenMP workers.

Why: numpy's OpenBLAS keeps a worker pool of its own that spin-waits after each call, and OpenMP's
workers spin too by default; on two cores the pools preempt each other, and beside any other busy
process a step collapses (a 0.3 ms GEMM took 36 ms; a SmolLM2 decode step went from ~60 ms to 5 s).
So here:
- the workers sleep, not spin, between regions (`OMP_WAIT_POLICY=PASSIVE`, set before Numba starts
  OpenMP unless the user chose a policy);
- a GEMM is a `prange` over slices of its output (rows or columns, whichever are more), each slice
  one single-threaded BLAS call (OpenBLAS float32 from numpy's own wheel, or MKL's bf16 GEMM from
  `kernels.amx`);
- work too small to repay waking a sleeping worker runs on the calling thread (`run_kernel`): a
  wake-up is ~5 us on an idle core, but waits for a time slice when the other core is busy.

Side effect, by design: importing this module makes numpy's OpenBLAS single-threaded for the whole
process (the reference backend's GEMMs in the same process run on one core).
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402  (after the OpenMP policy is set)
import numpy as np  # noqa: E402
from numba import prange  # noqa: E402

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
PARALLEL_MIN_WORK = 1 << 16   # elements a kernel touches before it is worth a second thread


def run_kernel(kernel, work: int, *args) -> None:
    """kernel(*args), a `parallel=True` Numba function, on one thread if `work` is small."""
    if work >= PARALLEL_MIN_WORK:
        kernel(*args)
        return
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        kernel(*args)
    finally:
        numba.set_num_threads(threads)


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


SGEMM = _load_openblas_sgemm()


@numba.njit(parallel=True, nogil=True, cache=True)
def _sliced_gemm(gemm, rows, cols, inner, a, lda, a_bytes, b, ldb, b_bytes, c, ldc, slices):
    """c[rows, cols] = a[rows, inner] @ b[cols, inner].T as `slices` BLAS calls, each on a range of
    the longer of c's two dimensions; a, b, c are addresses, ld* their row strides in elements,
    *_bytes the sizes of a's and b's elements."""
    split_rows = rows > cols
    length = rows if split_rows else cols
    width = -(-length // slices)
    for s in prange(slices):
        lo = s * width
        n = min(length - lo, width)
        if n > 0 and split_rows:
            gemm(_ROW_MAJOR, _NO_TRANS, _TRANS, n, cols, inner, np.float32(1.0), a + lo * lda * a_bytes, lda,
                 b, ldb, np.float32(0.0), c + lo * ldc * 4, ldc)
        elif n > 0:
            gemm(_ROW_MAJOR, _NO_TRANS, _TRANS, rows, n, inner, np.float32(1.0), a, lda,
                 b + lo * ldb * b_bytes, ldb, np.float32(0.0), c + lo * 4, ldc)


def _blas_rows(x: np.ndarray) -> tuple[np.ndarray, int]:
    """x itself and its row stride in elements if BLAS can read it in place, else a C-contiguous copy."""
    ld, rem = divmod(x.strides[0], x.itemsize)
    if x.strides[1] != x.itemsize or rem or ld < x.shape[1]:
        x = np.ascontiguousarray(x)
        ld = x.shape[1]
    return x, ld


def gemm_nt(a: np.ndarray, b: np.ndarray, gemm=None, out: np.ndarray | None = None) -> np.ndarray:
    """a [M, K] @ b [N, K].T -> float32 [M, N], split across Numba's threads.

    `gemm` is a cblas-style function whose operands are a's and b's dtype (default: float32 sgemm);
    rows of a and b may be strided (slices of a larger array); other layouts are copied first.
    """
    gemm = gemm or SGEMM
    if gemm is None:
        return np.matmul(a, b.T, out=out)
    (rows, inner), cols = a.shape, b.shape[0]
    if b.shape[1] != inner:
        raise ValueError(f"cannot multiply [{rows}, {inner}] by [{cols}, {b.shape[1]}].T")
    if out is None:
        out = np.empty((rows, cols), np.float32)
    if rows and cols and inner:
        (a, lda), (b, ldb) = _blas_rows(a), _blas_rows(b)
        _sliced_gemm(gemm, rows, cols, inner, a.ctypes.data, lda, a.itemsize, b.ctypes.data, ldb, b.itemsize,
                     out.ctypes.data, out.strides[0] // 4, numba.get_num_threads())
    else:
        out[...] = 0.0
    return out
