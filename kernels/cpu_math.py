"""How the Numba CPU kernels compile (`JIT`), and the scalar helpers LLVM can vectorise in them:
`fast_exp`, `coarse_exp2`, `row_max`, and the float <-> bits casts (`bf16_bits` rounds), and `silu_times`, SwiGLU's activation.

`JIT`: `nogil` (a serving thread runs steps while the asyncio loop and other threads keep going),
`cache=True` (a restart loads machine code from `__pycache__` instead of recompiling), and fast-math
without nnan/ninf (attention and norms keep IEEE semantics; reassoc lets reductions vectorise).

Numba's `np.exp` on float32 calls libm's scalar `expf` (pip's llvmlite has no SVML), so every loop
around it runs one element at a time: a 2048-token prefill spends seconds in the softmax and SiLU
exps alone. This version is plain arithmetic (Cody-Waite range reduction, a degree-6 polynomial,
the exponent written into the float's bits), which vectorises to 16 lanes with AVX-512.
Accuracy: relative error below 5e-7 (libm's is 6e-8) on [-87, 88]; inputs below clamp to
exp(-87.3) ~ 1e-38 (the smallest normal float) instead of 0, above ~88.4 the result is inf. Softmax
and SiLU do not see the difference (a softmax sum holds a 1; silu(-large) stays ~0).
`coarse_exp2` is for values rounded to bf16 next (2^-9 relative), where five digits are plenty: a
degree-4 polynomial in base 2 with no range-reduction split, 11 operations instead of 17.

A float max reduction does not vectorise either: without the `nnan` flag (kept off, above) LLVM must
keep `max`'s NaN order, so it runs one element per step (eight interleaved running maxima, tried
before, became eight scalar chains). `row_max` maximises integers instead: float32 bits with the
magnitude of negatives flipped order exactly as the floats do, and an integer max vectorises to 16
lanes. Over 256-wide softmax rows here: 0.26 -> 0.17 ns per element, most of what remains being the
call around it.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from kernels import cpu_target  # noqa: F401  (sets Numba up before the kernels below compile)

FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
JIT = dict(nogil=True, cache=True, fastmath=FASTMATH)

LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)          # ln 2 split so n * _LN2_HI is exact for |n| < 2^9
_LN2_LO = np.float32(-2.12194440e-4)
_LO, _HI = np.float32(-87.3), np.float32(88.7)


@intrinsic
def _float_from_bits(typingctx, bits):
    """Reinterpret an int32 as the float32 with the same bits (a no-op bitcast in LLVM)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@intrinsic
def float_bits(typingctx, value):
    """The bits of a float32 as a uint32 (a no-op bitcast in LLVM)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@numba.njit(inline="always", **JIT)
def _ordered(bits):
    """float32 bits (as int32) <-> an int32 that orders as the floats do: a negative float's
    magnitude bits are flipped, so larger magnitudes become smaller integers. Its own inverse."""
    return bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF))


@numba.njit(inline="always", **JIT)
def row_max(row, count):
    """max(row[:count]) for count >= 1, exactly, as an integer max over `_ordered` bits (see the
    module docstring). A NaN in the row counts as above every number."""
    peak = _ordered(np.int32(float_bits(row[0])))
    for c in range(1, count):
        peak = max(peak, _ordered(np.int32(float_bits(row[c]))))
    return _float_from_bits(_ordered(peak))


@numba.njit(inline="always", nogil=True, cache=True, fastmath={"contract", "nsz", "arcp"})
def fast_exp(x):
    """exp(x) for float32 x, vectorisable (see the module docstring for its range and accuracy)."""
    x = min(max(x, _LO), _HI)
    n = np.floor(x * LOG2E + np.float32(0.5))
    r = x - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _float_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


@numba.njit(inline="always", nogil=True, cache=True, fastmath={"contract", "nsz", "arcp"})
def coarse_exp2(x):
    """2^x for float32 x <= 128, relative error below 3e-6 (a least-squares fit of 2^f on [0, 1),
    f = x - floor(x)); inputs below -126 give 2^-126. The power of two is added to the exponent
    field of the polynomial's bits rather than multiplied in."""
    x = max(x, np.float32(-126.0))
    n = np.floor(x)
    f = x - n
    p = np.float32(0.013426788)
    p = p * f + np.float32(0.052240517)
    p = p * f + np.float32(0.24128287)
    p = p * f + np.float32(0.69304401)
    p = p * f + np.float32(1.0)
    return _float_from_bits(np.int32(float_bits(p)) + (np.int32(n) << np.int32(23)))


@numba.njit(inline="always", nogil=True, cache=True)
def bf16_bits(x):
    """float32 -> its bf16 bit pattern (uint16), rounded to nearest even."""
    b = float_bits(x)
    return np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@numba.njit(inline="always", **JIT)
def silu_times(gate, up):
    """silu(gate) * up, the SwiGLU activation."""
    return gate / (np.float32(1.0) + fast_exp(-gate)) * up
