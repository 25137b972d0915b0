"""The CPU backend gives the same bits in every process that loads its kernels from Numba's cache.

Why this is the guarantee, and not "the same bits in every process": a kernel with `parallel=True`
gives other bits in the process that compiled it than in a process that loaded it from the
cache. Measured on the Zen 3 VM (2026-12-07): decode attention over 201 keys gave outputs 3e-8
apart, compiling process against loading process, and a decode step through TINY's layers gave
logits 2e-6 apart. A serial wrapper around the same attention code gave identical bits in both,
and so did every process that loaded from the cache. Our reading: Numba links a parallel kernel's
loop body into its caller and optimises it again when the caller is cached, and with `reassoc`
LLVM may then sum a reduction in another order (numba/numba#8085 describes that second optimisation
of the cached path). So the first process after a kernel change differs at the ulp level from the
processes after it. The equality tests between two paths of one process allow 1e-5, since one path
can be fresh and the other cached.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from tests.conftest import REPO

DECODE_LOGITS = """
import sys
import numpy as np
from kernels.cpu import CpuKernels
from kernels.cpu_decode_step import CpuDecodeModel
from models.llama import LlamaModel, LlamaWeights
from models.random_weights import TINY, random_tensors
from refengine.bench.steps import decode_step, random_cache

kernels = CpuKernels(bf16=False)
model = LlamaModel(TINY, LlamaWeights.from_hf(random_tensors(TINY, seed=3), TINY, kernels), kernels)
step = decode_step(TINY, 2, 200, np.random.default_rng(1))
k_cache, v_cache = random_cache(model, int(step.block_tables.size))
op_by_op = model.forward(step, k_cache.copy(), v_cache.copy())
region = CpuDecodeModel(model).forward(step, k_cache.copy(), v_cache.copy())
np.save(sys.argv[1], np.stack([op_by_op, region]))
"""


def _logits_in_a_new_process(path) -> np.ndarray:
    subprocess.run([sys.executable, "-c", DECODE_LOGITS, str(path)], cwd=REPO, check=True, timeout=600)
    return np.load(path)


def test_processes_loading_the_cached_kernels_agree_bit_for_bit(tmp_path):
    """A decode step of 2 sequences over 200 cached keys, op by op and in one region: the first
    process compiles whatever the cache lacks, the next two load everything, and those two give
    the same bits, with the region equal to the op-by-op forward."""
    _logits_in_a_new_process(tmp_path / "warm.npy")
    first, second = (_logits_in_a_new_process(tmp_path / f"{i}.npy") for i in range(2))
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first[0], first[1])
