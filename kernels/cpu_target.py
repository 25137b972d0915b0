"""Process-wide settings Numba must have before it compiles anything: how its OpenMP workers wait,
and how wide the vectors it generates are. Every module with Numba kernels imports this one first.

Waiting: idle workers spin briefly, then sleep (`GOMP_SPINCOUNT=10000`, about 10 us, set before
Numba starts OpenMP unless the user chose a policy). libgomp's default spins for a long time, and on
two cores a spinning pool starves whatever else runs (the asyncio loop, another model's step, a
peer): SmolLM2 decode tok/s at batch 1 / 8 on 2 cores, quiet machine | beside two busy processes:
libgomp's default spin 42.6 / 190 | 1.1 / 6.8; never spinning (PASSIVE) 29.7 / 150 | 23 / 101;
this limit 41.7 / 186 | 17-19 / 68-86.

Cache freshness: Numba checks a cached kernel against the source of its own file only (a documented
limit of its cache). Most of ours inline helpers from other modules (`cpu_math`'s exp, the row
helpers `cpu.py` shares with the one-region step), so after one of those changed, a kernel in an
unchanged file would keep running the old helper's code. So every kernel's stamp here also covers
every source file of this package (`KernelsInTree`, `KernelsUserWide`, `KernelsUserProvided`,
through Numba's `CACHE_LOCATOR_CLASSES`): after any change to `kernels/`, every kernel compiles
afresh once.

Vector width: LLVM's tuning for Intel's AVX-512 cores (Skylake-X onwards, also the "rocketlake" a VM
reports here) prefers 256-bit vectors, so every loop Numba vectorises uses half the lanes the CPU
has. That tuning dates from Skylake-X, whose cores slowed their clock for 512-bit work; later ones
barely do. Where the CPU has AVX-512 and the user set no `NUMBA_CPU_FEATURES`, the host's features
go to Numba with `-prefer-256-bit` added. On the AMX Xeon of docs/benchmarks_cpu_kernels.md a
1,024-token decode attention took 136 us instead of 340.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import numba  # noqa: E402  (after the OpenMP wait policy is set)
from numba.core import caching  # noqa: E402
from numba.core.codegen import get_host_cpu_features  # noqa: E402

PREFER_256 = "prefer-256-bit"
# 32 vector registers of 512 bits, against AVX2's 16 of 256 (register-blocked kernels size their tiles by it)
HOST_AVX512 = "+avx512f" in get_host_cpu_features().split(",")


def wide_vector_features(host_features: str) -> str | None:
    """The feature string that lets LLVM use 512-bit vectors on this host, or None where it has no
    AVX-512 or the string already says which width it prefers."""
    features = host_features.split(",")
    if "+avx512f" not in features or any(f[1:] == PREFER_256 for f in features):
        return None
    return host_features + ",-" + PREFER_256


def _widen_vectors() -> None:
    """Numba reads `config.CPU_FEATURES` when its CPU target first compiles (or loads a cached
    kernel, whose index records the features, so a change recompiles instead of loading stale code)."""
    if numba.config.CPU_FEATURES is not None:
        return
    wide = wide_vector_features(get_host_cpu_features())
    if wide is not None:
        numba.config.CPU_FEATURES = wide


_widen_vectors()


@functools.cache
def package_stamp(package: Path = Path(__file__).parent) -> str:
    """A hash of every Python source of the package (`kernels/`)."""
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class _PackageStamped:
    """A Numba cache locator whose source stamp is its file's and the whole package's."""

    def get_source_stamp(self):
        return super().get_source_stamp(), package_stamp()


class KernelsUserProvided(_PackageStamped, caching.UserProvidedCacheLocator):
    pass


class KernelsInTree(_PackageStamped, caching.InTreeCacheLocator):
    pass


class KernelsUserWide(_PackageStamped, caching.UserWideCacheLocator):
    pass


def _stamp_caches_with_the_package() -> None:
    """Numba's locators in its own order of preference, each stamped with the package (unless the
    user chose locators, or this Numba predates the setting)."""
    if getattr(numba.config, "CACHE_LOCATOR_CLASSES", "unsupported"):
        return
    numba.config.CACHE_LOCATOR_CLASSES = ",".join(
        [f"{__name__}.{cls.__name__}" for cls in (KernelsUserProvided, KernelsInTree, KernelsUserWide)]
        + ["IPythonCacheLocator", "ZipCacheLocator"])


_stamp_caches_with_the_package()
