"""Our bf16 GEMM on the AMX tile unit, for the layer GEMMs of a prefill (x @ W.T, float32 out), and
the tile helpers the bf16 attention (`kernels.cpu_attention._flash_bf16`) multiplies with.

Why not MKL's `cblas_gemm_bf16bf16f32` for these, as at first: each call lays both operands out
afresh in the tile unit's formats, which at prefill sizes costs as much as the multiply. Here each
weight is laid out once, when its bf16 copy is made, and each activation matrix is written in tile
layout by the pass that produces it anyway (the bf16 conversion, or SiLU). Over 30 layers' four
GEMMs (SmolLM2 shapes, 2 cores of the AMX Xeon, interleaved, medians): 128 tokens 44 → 25 ms,
512 tokens 110 → 84 ms, 2048 tokens 361 → 322 ms against MKL.

Layouts and the work split: `kernels.bf16_layout`.

The kernel: tiles 0-3 accumulate 32 tokens x 32 outputs of float32, 4-5 hold the A tiles of the two
16-token halves, 6-7 the B tiles of the two 16-output halves; per 32 inputs, four loads and four tile
dot products. A work item is GROUP_PAIRS such 32-output blocks (their B panel, 110 KiB at I = 576,
stays in L2) for up to CHUNK_BLOCKS 32-token blocks. Consecutive items share their token chunk and
step through the output groups, so a thread keeps its chunk of A (590 KiB at 512 tokens) in L2
while the B panels stream past; with all 2,048 tokens of a long prompt in one item, A (2.3 MiB)
came from L3 for every group instead (its GEMMs 1.02-1.17x, whole step within the noise).
A chunk is also at most 1/threads of the tokens, so that each thread (the prange hands out items
in contiguous runs) multiplies token rows of its own: the rows it writes are then the rows the
next kernels' threads read (the norm, the bf16 conversion and the next GEMM split tokens the same
way), from their own L2. With all of 512 tokens in one chunk, the threads split the outputs and
the next GEMM read half its A from the other core (512-token AMX step 1.04-1.07x, 128 tokens
1.03x, alternating A/Bs; the down GEMM after SwiGLU 1.05x by medians, 1.15x by minimums).
`swiglu` is the same kernel for the MLP's gate|up weight, applying SiLU to each output block
before it leaves the core.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from kernels.amx_instructions import (TILE_BYTES, TILE_CONFIG, prefetch_line, tile_config, tile_dot, tile_load,
                                     tile_release, tile_store, tile_zero)
from kernels.bf16_layout import (TileRows, TileWeight, check_inputs, chunk_blocks, work_item, work_items,
                                 write_swiglu_block)
from kernels.cpu_math import JIT

GROUP_PAIRS = 3      # 32-output blocks per work item (1-9 tried: 3 was best)
CHUNK_BLOCKS = 16    # 32-token blocks per work item (8, 16, 32 tried at 2,048 tokens: 16 was best)


# ---------------------------------------------------------------- the GEMMs
@numba.njit(inline="always", nogil=True, cache=True)
def zero_block():
    """Tiles 0-3, a 32 x 32 float32 block (0: rows 0-15 x columns 0-15, 1: rows 0-15 x 16-31,
    2 and 3 the same for rows 16-31), = 0."""
    tile_zero(0)
    tile_zero(1)
    tile_zero(2)
    tile_zero(3)


@numba.njit(inline="always", nogil=True, cache=True)
def prefetch_tile(address, stride):
    """Prefetch the 16 rows of a tile (64 bytes each, `stride` bytes apart)."""
    for row in range(16):
        prefetch_line(address + row * stride)


@numba.njit(inline="always", nogil=True, cache=True)
def dot_block(a0, a1, b0, b1, k_tiles, a_stride=64, a_step=TILE_BYTES):
    """Tiles 0-3 += A @ B over k_tiles x 32 inputs. A's tiles for the two 16-row halves start at
    a0, a1, rows `a_stride` bytes apart, each next 32 inputs `a_step` bytes on (by default the
    `TileRows` layout; a row-major bf16 matrix has its row bytes and 64); B's for the two 16-column
    halves at b0, b1, each k tile the next KiB (`TileWeight` layout).

    Tile loads, not the dot products, bound this loop (here a KiB tile load from L1 took about
    twice as long as a tile dot product), and a load that misses L1 waits on the whole row
    fetch; so the next step's four tiles are prefetched while this step's multiply (+11-18% over
    30 layers' GEMMs at 128 tokens, +10% at 512)."""
    for k in range(k_tiles):
        if k + 1 < k_tiles:
            prefetch_tile(a0 + (k + 1) * a_step, a_stride)
            prefetch_tile(a1 + (k + 1) * a_step, a_stride)
            prefetch_tile(b0 + (k + 1) * TILE_BYTES, 64)
            prefetch_tile(b1 + (k + 1) * TILE_BYTES, 64)
        tile_load(4, a0 + k * a_step, a_stride)
        tile_load(5, a1 + k * a_step, a_stride)
        tile_load(6, b0 + k * TILE_BYTES, 64)
        tile_load(7, b1 + k * TILE_BYTES, 64)
        tile_dot(0, 4, 6)
        tile_dot(1, 4, 7)
        tile_dot(2, 5, 6)
        tile_dot(3, 5, 7)


@numba.njit(inline="always", nogil=True, cache=True)
def load_block(c, row_bytes):
    """Tiles 0-3 = the float32 block at address c, rows `row_bytes` apart (to accumulate into)."""
    tile_load(0, c, row_bytes)
    tile_load(1, c + 64, row_bytes)
    tile_load(2, c + 16 * row_bytes, row_bytes)
    tile_load(3, c + 16 * row_bytes + 64, row_bytes)


@numba.njit(inline="always", nogil=True, cache=True)
def store_block(c, row_bytes):
    """Tiles 0-3 (see `zero_block`) into float32 rows `row_bytes` apart from address c."""
    tile_store(0, c, row_bytes)
    tile_store(1, c + 64, row_bytes)
    tile_store(2, c + 16 * row_bytes, row_bytes)
    tile_store(3, c + 16 * row_bytes + 64, row_bytes)


@numba.njit(inline="always", nogil=True, cache=True)
def _product_block(a_base, b_base, block, pair, block_bytes, k_tiles):
    """Tiles 0-3 = the 32 x 32 float32 block of A @ B for 32-token block `block` and 32-output block
    `pair`, A and B in tile layout (`block_bytes` = one 16-row block of either)."""
    a0 = a_base + 2 * block * block_bytes
    b0 = b_base + 2 * pair * block_bytes
    zero_block()
    dot_block(a0, a0 + block_bytes, b0, b0 + block_bytes, k_tiles)


@numba.njit(parallel=True, nogil=True, cache=True)
def _tile_matmul(a, b, out, config, threads):
    """out [T, O] (T, O padded to 32) = A @ B with a [T/16, I/32, 16, 32] and b [O/16, I/2, 16, 2]."""
    k_tiles = a.shape[1]
    token_blocks, pairs = out.shape[0] // 32, out.shape[1] // 32
    row_bytes = out.shape[1] * 4
    block_bytes = k_tiles * TILE_BYTES          # one 16-row block of a, or 16-output block of b
    chunk = chunk_blocks(token_blocks, threads, CHUNK_BLOCKS)
    for item in prange(work_items(token_blocks, pairs, chunk, GROUP_PAIRS)):
        tile_config(config.ctypes.data)
        blocks, outputs = work_item(item, token_blocks, pairs, chunk, GROUP_PAIRS)
        for block in blocks:
            for pair in outputs:
                _product_block(a.ctypes.data, b.ctypes.data, block, pair, block_bytes, k_tiles)
                store_block(out.ctypes.data + block * 32 * row_bytes + pair * 128, row_bytes)
        tile_release()


@numba.njit(parallel=True, **JIT)
def _tile_swiglu(a, b, act, config, threads):
    """act (A-tile layout, [T/16, F/32, 16, 32] bf16) = silu(gate) * up of A @ B, with b the
    interleaved gate|up of `TileWeight.pack_gated`: each 32 x 32 float32 block (16 gate and their 16
    up outputs for 32 tokens) goes through a 4 KiB scratch, never to memory."""
    k_tiles = a.shape[1]
    token_blocks, pairs = a.shape[0] // 2, b.shape[0] // 2
    block_bytes = k_tiles * TILE_BYTES
    chunk = chunk_blocks(token_blocks, threads, CHUNK_BLOCKS)
    for item in prange(work_items(token_blocks, pairs, chunk, GROUP_PAIRS)):
        tile_config(config.ctypes.data)
        scratch = np.empty((32, 32), np.float32)
        blocks, outputs = work_item(item, token_blocks, pairs, chunk, GROUP_PAIRS)
        for block in blocks:
            for pair in outputs:
                _product_block(a.ctypes.data, b.ctypes.data, block, pair, block_bytes, k_tiles)
                store_block(scratch.ctypes.data, 128)
                write_swiglu_block(scratch, act, block, pair)
        tile_release()


def matmul(x: TileRows, weight: TileWeight) -> np.ndarray:
    """x @ weight.T, float32 [x.rows, weight.outputs]: a view of the padded result (contiguous
    unless the outputs were padded)."""
    check_inputs(x, weight)
    out = np.empty((x.tiles.shape[0] * 16, weight.tiles.shape[0] * 16), np.float32)
    _tile_matmul(x.tiles, weight.tiles, out, TILE_CONFIG, numba.get_num_threads())
    return out[:x.rows, :weight.outputs]


def swiglu(x: TileRows, gate_up: TileWeight) -> TileRows:
    """silu(x @ gate.T) * (x @ up.T) in bf16 tile layout (the down GEMM's operand), for a weight
    packed by `TileWeight.pack_gated`."""
    check_inputs(x, gate_up)
    act = TileRows.empty(x.rows, gate_up.outputs)
    _tile_swiglu(x.tiles, gate_up.tiles, act.tiles, TILE_CONFIG, numba.get_num_threads())
    return act
