"""The AMX tile instructions as Numba intrinsics, for the tile kernels (`kernels.amx_tiles`, the bf16
attention in `kernels.cpu_attention`): configure, zero, load, store, multiply, release, and a cache
prefetch. Each emits the LLVM x86 intrinsic of its instruction; tile numbers are immediates, so they
must be literal ints at the call.

Every kernel here uses one configuration, `TILE_CONFIG`: all 8 tiles 16 rows of 64 bytes (a KiB).
Linux hands the tile state to a process only once asked (`arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)`, `request_tile_permission`); a tile instruction before that kills it (SIGILL).
"""
from __future__ import annotations

import ctypes

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

TILE_BYTES = 1024    # 16 rows x 64 bytes, every tile here

# palette 1; each of the 8 tiles 16 rows of 64 bytes (bytes 16-31: bytes per row, 48-55: rows)
TILE_CONFIG = np.zeros(64, np.uint8)
TILE_CONFIG[0] = 1
TILE_CONFIG[16:32].view(np.uint16)[:] = 64
TILE_CONFIG[48:56] = 16


def request_tile_permission() -> bool:
    """Ask Linux for the AMX tile state for this process (idempotent); False if refused."""
    sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
    try:
        return ctypes.CDLL(None, use_errno=True).syscall(sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata) == 0
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------- the tile instructions, from Numba
_I8, _I64, _PTR = ir.IntType(8), ir.IntType(64), ir.PointerType(ir.IntType(8))


def _call(builder, name: str, arg_types: list, args: list) -> None:
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), arg_types), name)
    builder.call(fn, args)


def _literals(*values) -> bool:
    """Tile numbers are immediates: the intrinsics type only on literal ints (Numba retries so)."""
    return all(isinstance(v, types.IntegerLiteral) for v in values)


@intrinsic
def tile_config(typingctx, address):
    """ldtilecfg: this thread's tile shapes from the 64-byte config at `address`."""
    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.ldtilecfg", [_PTR], [builder.inttoptr(args[0], _PTR)])
        return context.get_dummy_value()
    return types.void(types.intp), codegen


@intrinsic
def tile_release(typingctx):
    """tilerelease: back to the initial state, so context switches save no tile data."""
    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tilerelease", [], [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def tile_zero(typingctx, tile):
    if not _literals(tile):
        return None
    number = tile.literal_value

    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tilezero", [_I8], [ir.Constant(_I8, number)])
        return context.get_dummy_value()
    return types.void(tile), codegen


def _tile_memory(name: str):
    """tileloadd / tilestored: tile <-> 16 rows at `address`, `stride` bytes apart."""
    def typer(typingctx, tile, address, stride):
        if not _literals(tile):
            return None
        number = tile.literal_value

        def codegen(context, builder, signature, args):
            _call(builder, name, [_I8, _PTR, _I64], [ir.Constant(_I8, number), builder.inttoptr(args[1], _PTR), args[2]])
            return context.get_dummy_value()
        return types.void(tile, types.intp, types.intp), codegen
    typer.__name__ = typer.__qualname__ = name.rsplit(".", 1)[-1]
    return intrinsic(typer)


tile_load = _tile_memory("llvm.x86.tileloadd64")
tile_store = _tile_memory("llvm.x86.tilestored64")


@intrinsic
def tile_dot(typingctx, acc, a, b):
    """tdpbf16ps: float32 tile `acc` += bf16 tile `a` (16 x 32) @ tile `b` (32 x 16, pair format)."""
    if not _literals(acc, a, b):
        return None
    numbers = [ir.Constant(_I8, t.literal_value) for t in (acc, a, b)]

    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tdpbf16ps", [_I8, _I8, _I8], numbers)
        return context.get_dummy_value()
    return types.void(acc, a, b), codegen


@intrinsic
def prefetch_line(typingctx, address):
    """prefetcht0: start bringing the cache line at `address` into L1, without waiting for it."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        read, all_levels, data = (ir.Constant(i32, v) for v in (0, 3, 1))
        _call(builder, "llvm.prefetch.p0i8", [_PTR, i32, i32, i32],
              [builder.inttoptr(args[0], _PTR), read, all_levels, data])
        return context.get_dummy_value()
    return types.void(types.intp), codegen
