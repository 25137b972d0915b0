"""`fast_exp`: an exp that LLVM can vectorise inside Numba loops.

Numba's `np.exp` on float32 calls libm's scalar `expf` (pip's llvmlite has no SVML), so every loop
around it runs one element at a time: a 2048-token prefill spends seconds in the softmax and SiLU
exps alone. This version is plain arithmetic (Cody-Waite range reduction, a degree-6 polynomial,
the exponent written into the float's bits), which vectorises to 16 lanes with AVX-512.
Accuracy: relative error below 5e-7 (libm's is 6e-8) on [-87, 88]; inputs below clamp to
exp(-87.3) ~ 1e-38 (the smallest normal float) instead of 0, above ~88.4 the result is inf. Softmax
and SiLU do not see the difference (a softmax sum holds a 1; silu(-large) stays ~0).
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)          # ln 2 split so n * _LN2_HI is exact for |n| < 2^9
_LN2_LO = np.float32(-2.12194440e-4)
_LO, _HI = np.float32(-87.3), np.float32(88.7)


@intrinsic
def _float_from_bits(typingctx, bits):
    """Reinterpret an int32 as the float32 with the same bits (a no-op bitcast in LLVM)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@numba.njit(inline="always", nogil=True, cache=True, fastmath={"contract", "nsz", "arcp"})
def fast_exp(x):
    """exp(x) for float32 x, vectorisable (see the module docstring for its range and accuracy)."""
    x = min(max(x, _LO), _HI)
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _float_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
