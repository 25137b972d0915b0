"""Threads of one Numba parallel region waiting for each other: a check-in and a barrier.

Numba's `prange` ends each parallel region with a join, and a region costs a launch from Python (a
few microseconds, more with the caches cold after a weight stream). A program that runs many
dependent phases in one region (`kernels.cpu_decode_step`) needs its threads to wait for each other
between phases instead. Here that is an atomic counter on an int64 `sync` array of `SYNC_WORDS`
words (zeroed for each run), with its fields on separate cache lines:

- `check_in`: every part of the region arrives before any waits at a barrier. A barrier needs each
  part on a thread of its own. If the threading layer ran two parts on one thread (TBB can, or an
  OpenMP team smaller than asked for), the first would wait forever for the second. So a part that
  waits too long closes the check-in instead, and every part then returns without doing anything.
- `barrier`: the last part to arrive starts the next generation; the others spin on it with
  `pause`, giving up their core (`sched_yield`) every few thousand spins so that a descheduled
  partner can run on a busy machine.
"""
from __future__ import annotations

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels.cpu_math import JIT

SYNC_WORDS = 24                  # three cache lines: barrier count, barrier generation, check-in
_COUNT, _GENERATION, _CHECK_IN = 0, 64, 128     # byte offsets of the fields
_CLOSED = -(1 << 40)             # the check-in count once closed: every later arrival reads it negative
SPINS_PER_YIELD = 4096
CHECK_IN_YIELDS = 200            # ~20 ms of waiting (more on a busy machine): then the check-in closes

_I64 = ir.IntType(64)
_P64 = ir.PointerType(_I64)


@intrinsic
def _fetch_add(typingctx, address, delta):
    """Atomically add `delta` to the int64 at `address`; the value before."""
    def codegen(context, builder, signature, args):
        return builder.atomic_rmw("add", builder.inttoptr(args[0], _P64), args[1], "seq_cst")
    return types.int64(types.intp, types.int64), codegen


@intrinsic
def _compare_swap(typingctx, address, expected, new):
    """Atomically replace the int64 at `address` by `new` if it holds `expected`; whether it did."""
    def codegen(context, builder, signature, args):
        pair = builder.cmpxchg(builder.inttoptr(args[0], _P64), args[1], args[2], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 1)
    return types.boolean(types.intp, types.int64, types.int64), codegen


@intrinsic
def _load(typingctx, address):
    def codegen(context, builder, signature, args):
        return builder.load_atomic(builder.inttoptr(args[0], _P64), "acquire", 8)
    return types.int64(types.intp), codegen


@intrinsic
def _store(typingctx, address, value):
    def codegen(context, builder, signature, args):
        builder.store_atomic(args[1], builder.inttoptr(args[0], _P64), "release", 8)
        return context.get_dummy_value()
    return types.void(types.intp, types.int64), codegen


@intrinsic
def _pause(typingctx):
    """The x86 spin-wait hint: the core waits a few dozen cycles and lets memory traffic settle."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def _yield_core(typingctx):
    """libc's sched_yield: let another runnable thread have this core."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@numba.njit(inline="always", **JIT)
def _wait_a_little(spins):
    _pause()
    if spins % SPINS_PER_YIELD == SPINS_PER_YIELD - 1:
        _yield_core()


@numba.njit(inline="always", **JIT)
def check_in(sync, parts):
    """True once all `parts` parts have arrived, each on its own thread; False for every part if
    the check-in closed first (then none may wait at a barrier)."""
    address = sync.ctypes.data + _CHECK_IN
    if _fetch_add(address, 1) < 0:
        return False
    spins = 0
    while True:
        arrived = _load(address)
        if arrived == parts:
            return True
        if arrived < 0:
            return False
        if spins >= CHECK_IN_YIELDS * SPINS_PER_YIELD and _compare_swap(address, arrived, _CLOSED):
            return False
        _wait_a_little(spins)
        spins += 1


@numba.njit(inline="always", **JIT)
def checked_in(sync, parts):
    """After the region: whether its parts ran (the check-in did not close)."""
    return _load(sync.ctypes.data + _CHECK_IN) == parts


@numba.njit(inline="always", **JIT)
def barrier(sync, parts):
    """Wait until all `parts` parts have reached this barrier (after `check_in`)."""
    count, generation = sync.ctypes.data + _COUNT, sync.ctypes.data + _GENERATION
    current = _load(generation)
    if _fetch_add(count, 1) == parts - 1:
        _store(count, 0)
        _store(generation, current + 1)
        return
    spins = 0
    while _load(generation) == current:
        _wait_a_little(spins)
        spins += 1
