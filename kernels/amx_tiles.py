"""The 32 x 32 block product of the bf16 prefill kernels (`kernels.bf16_gemm`, the bf16 prompt
attention in `kernels.cpu_attention`) on the AMX tile unit: bf16 inputs, float32 accumulation and
output, on the operand layouts of `kernels.bf16_layout`.

Tiles 0-3 accumulate 32 rows x 32 outputs of float32, 4-5 hold the A tiles of the two 16-row
halves, 6-7 the B tiles of the two 16-output halves; per 32 inputs, four loads and four tile dot
products (`dot_block`). A thread configures the tiles once per work item (`begin_blocks`) and
releases them after (`end_blocks`), so context switches save no tile data.

Why not MKL's `cblas_gemm_bf16bf16f32` for the layer GEMMs, as at first: each call lays both
operands out afresh in the tile unit's formats, which at prefill sizes costs as much as the
multiply. Here each weight is laid out once, when its bf16 copy is made, and each activation matrix
is written in tile layout by the pass that produces it anyway (the bf16 conversion, or SiLU). Over
30 layers' four GEMMs (SmolLM2 shapes, 2 cores of the AMX Xeon, interleaved, medians): 128 tokens
44 → 25 ms, 512 tokens 110 → 84 ms, 2048 tokens 361 → 322 ms against MKL.
"""
from __future__ import annotations

import numba

from kernels import cpu_target  # noqa: F401  (sets Numba up before the kernels below compile)
from kernels.amx_instructions import (TILE_BYTES, TILE_CONFIG, prefetch_line, tile_config, tile_dot, tile_load,
                                     tile_release, tile_store, tile_zero)


# ---------------------------------------------------------------- the block product
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
def begin_blocks():
    """This thread's tile shapes (`TILE_CONFIG`), before its first block product."""
    tile_config(TILE_CONFIG.ctypes.data)


@numba.njit(inline="always", nogil=True, cache=True)
def end_blocks():
    """Tiles back to the initial state (`tile_release`), after a thread's last block product."""
    tile_release()


@numba.njit(inline="always", nogil=True, cache=True)
def product_block(a0, a1, b0, b1, k_tiles, a_stride, a_step, c, c_row_bytes):
    """The 32 x 32 float32 block at address c (rows `c_row_bytes` apart) = A @ B, operands as for
    `dot_block`; between `begin_blocks` and `end_blocks`. The AVX512-BF16 kernel has the same call."""
    zero_block()
    dot_block(a0, a1, b0, b1, k_tiles, a_stride, a_step)
    store_block(c, c_row_bytes)


@numba.njit(inline="always", nogil=True, cache=True)
def add_product_block(a0, a1, b0, b1, k_tiles, a_stride, a_step, c, c_row_bytes):
    """`product_block`, added to the block at c instead of written over it."""
    load_block(c, c_row_bytes)
    dot_block(a0, a1, b0, b1, k_tiles, a_stride, a_step)
    store_block(c, c_row_bytes)
