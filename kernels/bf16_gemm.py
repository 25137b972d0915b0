"""The bf16 prefill GEMMs, x @ W.T and the MLP's gate/up GEMM with SiLU applied before its block
leaves the core, written once over the 32 x 32 block product that both bf16 units provide: AMX tiles
(`kernels.amx_tiles`) and AVX512-BF16 dot products (`kernels.avx512_bf16`). Operands in the
layouts of `kernels.bf16_layout`; float32 accumulation.

Which unit a kernel runs on is a type: `AMX` and `AVX512_BF16` are empty marker arrays of different
dtypes, passed as a kernel's first argument, and `product_block(route, ...)` (with `begin_blocks`,
`end_blocks`, `add_product_block`) resolves at compile time to that unit's function. So each route
compiles (and caches) its own specialization of one kernel body, and a CPU without AMX never
compiles a tile instruction. (A function passed as an argument would do the same, but Numba does
not cache kernels that take one.)

The work split (`kernels.bf16_layout`): a work item is GROUP_PAIRS 32-output blocks (their weight
panel, 110 KiB at I = 576, stays in L2) for up to CHUNK_BLOCKS 32-token blocks. Consecutive items
share their token chunk and step through the output groups, so a thread keeps its chunk of A (590
KiB at 512 tokens) in L2 while the weight panels stream past; with all 2,048 tokens of a long
prompt in one item, A (2.3 MiB) came from L3 for every group instead (AMX GEMMs 1.02-1.17x, whole
step within the noise). A chunk is also at most 1/threads of the tokens, so that each thread (the
prange hands out items in contiguous runs) multiplies token rows of its own: the rows it writes
are then the rows the next kernels' threads read (the norm, the bf16 conversion and the next GEMM
split tokens the same way), from their own L2. With all of 512 tokens in one chunk, the threads
split the outputs and the next GEMM read half its A from the other core (512-token AMX step
1.04-1.07x, 128 tokens 1.03x, alternating A/Bs). On AVX512-BF16 (Zen 4 VM) GROUP_PAIRS 1-6 and
CHUNK_BLOCKS 4-64 all came out within the noise of these.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange, types
from numba.extending import overload

from kernels import amx_tiles, avx512_bf16
from kernels.bf16_layout import TileRows, TileWeight, check_inputs, chunk_blocks, work_item, work_items, write_swiglu_block
from kernels.cpu_math import JIT
from kernels.cpu_threads import POOL_THREADS

GROUP_PAIRS = 3      # 32-output blocks per work item (AMX: 1-9 tried, 3 was best)
CHUNK_BLOCKS = 16    # 32-token blocks per work item (AMX: 8, 16, 32 tried at 2,048 tokens, 16 was best)

AMX = np.zeros(0, np.uint8)             # route markers: see the module docstring
AVX512_BF16 = np.zeros(0, np.uint16)


# ---------------------------------------------------------------- the block product, by route
def _unit(route):
    """The module whose block product a route marker's type selects (at compile time)."""
    return amx_tiles if route.dtype == types.uint8 else avx512_bf16


def begin_blocks(route):
    """Before a thread's first block product (AMX: configure the tiles). Numba only."""
    raise NotImplementedError("begin_blocks is compiled into Numba kernels")


def end_blocks(route):
    """After a thread's last block product (AMX: release the tiles). Numba only."""
    raise NotImplementedError("end_blocks is compiled into Numba kernels")


def product_block(route, a0, a1, b0, b1, k_tiles, a_stride, a_step, c, c_row_bytes):
    """The 32 x 32 float32 block at address c = A @ B on the route's unit (arguments: see
    `kernels.amx_tiles.dot_block`). Numba only."""
    raise NotImplementedError("product_block is compiled into Numba kernels")


def add_product_block(route, a0, a1, b0, b1, k_tiles, a_stride, a_step, c, c_row_bytes):
    """`product_block` added to the block at c. Numba only."""
    raise NotImplementedError("add_product_block is compiled into Numba kernels")


@overload(begin_blocks, inline="always")
def _begin_blocks(route):
    begin = _unit(route).begin_blocks
    return lambda route: begin()


@overload(end_blocks, inline="always")
def _end_blocks(route):
    end = _unit(route).end_blocks
    return lambda route: end()


@overload(product_block, inline="always")
def _product_block(route, a0, a1, b0, b1, k_tiles, a_stride, a_step, c, c_row_bytes):
    product = _unit(route).product_block
    return lambda route, a0, a1, b0, b1, k_tiles, a_stride, a_step, c, c_row_bytes: \
        product(a0, a1, b0, b1, k_tiles, a_stride, a_step, c, c_row_bytes)


@overload(add_product_block, inline="always")
def _add_product_block(route, a0, a1, b0, b1, k_tiles, a_stride, a_step, c, c_row_bytes):
    product = _unit(route).add_product_block
    return lambda route, a0, a1, b0, b1, k_tiles, a_stride, a_step, c, c_row_bytes: \
        product(a0, a1, b0, b1, k_tiles, a_stride, a_step, c, c_row_bytes)


# ---------------------------------------------------------------- the GEMMs
@numba.njit(inline="always", nogil=True, cache=True)
def _layout_block(route, a, b, block, pair, block_bytes, k_tiles, c, c_row_bytes):
    """The block of A @ B for 32-token block `block` and 32-output block `pair`, both operands in
    their layouts (`block_bytes` = one 16-row block of either), into rows `c_row_bytes` apart at c."""
    a0, b0 = a + 2 * block * block_bytes, b + 2 * pair * block_bytes
    product_block(route, a0, a0 + block_bytes, b0, b0 + block_bytes, k_tiles, 64, 1024, c, c_row_bytes)


@numba.njit(parallel=True, nogil=True, cache=True)
def _matmul(route, a, b, out, threads):
    """out [T, O] (T, O padded to 32) = A @ B with a [T/16, I/32, 16, 32] and b [O/16, I/2, 16, 2]."""
    k_tiles = a.shape[1]
    token_blocks, pairs = out.shape[0] // 32, out.shape[1] // 32
    row_bytes = out.shape[1] * 4
    block_bytes = k_tiles * 1024          # one 16-row block of a, or 16-output block of b
    chunk = chunk_blocks(token_blocks, threads, CHUNK_BLOCKS)
    for item in prange(work_items(token_blocks, pairs, chunk, GROUP_PAIRS)):
        begin_blocks(route)
        blocks, outputs = work_item(item, token_blocks, pairs, chunk, GROUP_PAIRS)
        for block in blocks:
            for pair in outputs:
                _layout_block(route, a.ctypes.data, b.ctypes.data, block, pair, block_bytes, k_tiles,
                              out.ctypes.data + block * 32 * row_bytes + pair * 128, row_bytes)
        end_blocks(route)


@numba.njit(parallel=True, **JIT)
def _swiglu(route, a, b, act, threads):
    """act (A-tile layout, [T/16, F/32, 16, 32] bf16) = silu(gate) * up of A @ B, with b the
    interleaved gate|up of `TileWeight.pack_gated`: each 32 x 32 float32 block (16 gate and their 16
    up outputs for 32 tokens) goes through a 4 KiB scratch, never to memory."""
    k_tiles = a.shape[1]
    token_blocks, pairs = a.shape[0] // 2, b.shape[0] // 2
    block_bytes = k_tiles * 1024
    chunk = chunk_blocks(token_blocks, threads, CHUNK_BLOCKS)
    for item in prange(work_items(token_blocks, pairs, chunk, GROUP_PAIRS)):
        begin_blocks(route)
        scratch = np.empty((32, 32), np.float32)
        blocks, outputs = work_item(item, token_blocks, pairs, chunk, GROUP_PAIRS)
        for block in blocks:
            for pair in outputs:
                _layout_block(route, a.ctypes.data, b.ctypes.data, block, pair, block_bytes, k_tiles,
                              scratch.ctypes.data, 128)
                write_swiglu_block(scratch, act, block, pair)
        end_blocks(route)


def matmul(route: np.ndarray, x: TileRows, weight: TileWeight) -> np.ndarray:
    """x @ weight.T on `route` (`AMX` or `AVX512_BF16`), float32 [x.rows, weight.outputs]: a view of
    the padded result (contiguous unless the outputs were padded)."""
    check_inputs(x, weight)
    out = np.empty((x.tiles.shape[0] * 16, weight.tiles.shape[0] * 16), np.float32)
    _matmul(route, x.tiles, weight.tiles, out, POOL_THREADS)
    return out[:x.rows, :weight.outputs]


def swiglu(route: np.ndarray, x: TileRows, gate_up: TileWeight) -> TileRows:
    """silu(x @ gate.T) * (x @ up.T) in bf16 tile layout (the down GEMM's operand) on `route`, for a
    weight packed by `TileWeight.pack_gated`."""
    check_inputs(x, gate_up)
    act = TileRows.empty(x.rows, gate_up.outputs)
    _swiglu(route, x.tiles, gate_up.tiles, act.tiles, POOL_THREADS)
    return act
