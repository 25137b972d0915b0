"""The bf16 operand layouts of the prefill GEMMs, and how those GEMMs split their work across
threads. Both bf16 kernels use them: the AMX tile kernel (`kernels.amx_tiles`) and the AVX512-BF16
dot-product kernel (`kernels.avx512_bf16`), so a weight is laid out once whichever runs.

Layouts (bf16 bit patterns in uint16; dimensions padded with zeros to whole tiles):
- `TileWeight`: W [O, I] as [O/16, I/2, 16, 2]. For each 16 outputs, 32 inputs make one B tile of
  W.T in AMX's pair format (row k/2 holds inputs k and k+1 of each of the 16 outputs), one
  contiguous KiB. Each 64-byte row is also exactly the vector operand `vdpbf16ps` multiplies by: 16
  outputs x one input pair.
- `TileRows`: x [T, I] as [T/16, I/32, 16, 32]: 16 tokens x 32 inputs make one A tile, one
  contiguous KiB, so the hardware prefetcher streams it. (Loading tiles straight out of the
  row-major matrix, 16 rows 1,152 bytes apart, was 10-15% slower from 512 tokens.) T is padded to a
  multiple of 32; the padded rows' outputs are computed and dropped.

The work split: the output is cut into blocks of 32 tokens x 32 outputs; a work item is a chunk of
up to `most_blocks` token blocks times a group of `group_pairs` output blocks, items chunk-major
(consecutive items share their token chunk and step through the output groups), and a chunk is at
most 1/threads of the tokens. Each kernel's module says why its sizes are what they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import prange

from kernels.cpu_math import JIT, bf16_bits, silu_times


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a whole number of `multiple`s (tiles pad every dimension so)."""
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class TileRows:
    """An activation matrix [rows, width] in A-tile layout (see the module docstring). Element
    (t, i) is at tiles[t // 16, i // 32, t % 16, i % 32]."""

    tiles: np.ndarray    # uint16 [rows/16, width/32, 16, 32], both padded
    rows: int

    @classmethod
    def empty(cls, rows: int, width: int) -> "TileRows":
        """Uninitialised but for the padding, which is zeroed (it must hold finite values)."""
        tiles = np.empty((round_up(rows, 32) // 16, round_up(width, 32) // 32, 16, 32), np.uint16)
        tiles[-(-rows // 16):] = 0
        if rows % 16:
            tiles[rows // 16, :, rows % 16:] = 0
        if width % 32:
            tiles[:, width // 32, :, width % 32:] = 0
        return cls(tiles, rows)

    @classmethod
    def convert(cls, x: np.ndarray) -> "TileRows":
        """float32 [T, I] -> bf16 (round to nearest even) in tile layout, one parallel pass."""
        rows = cls.empty(*x.shape)
        _rows_to_tiles(x, rows.tiles)
        return rows


@numba.njit(inline="always", nogil=True, cache=True)
def tile_position(i):
    """Column i of a row -> (its tile column, its place in the tile's row)."""
    return i >> 5, i & 31


@numba.njit(parallel=True, nogil=True, cache=True)
def _rows_to_tiles(x, tiles):
    """x [T, I] float32 -> tiles (bf16); 32 contiguous values per tile row, so the copy vectorises."""
    whole = x.shape[1] >> 5
    for t in prange(x.shape[0]):
        block, row = t >> 4, t & 15
        for c in range(whole):
            for j in range(32):
                tiles[block, c, row, j] = bf16_bits(x[t, 32 * c + j])
        for i in range(32 * whole, x.shape[1]):
            c, j = tile_position(i)
            tiles[block, c, row, j] = bf16_bits(x[t, i])


@numba.njit(parallel=True, nogil=True, cache=True)
def _weight_to_tiles(weight, tiles, features, gated):
    """weight [O, I] float32 -> tiles (bf16), rounding and laying out in one parallel pass over the
    16-output tile rows. Plain: tile row b holds outputs 16b..16b+15. `gated` (a stacked gate|up
    [2F, I]): tile rows alternate gate and up, so rows 2j and 2j+1 hold gate and up outputs
    16j..16j+15. Outputs past the weight (or past F) are zero; so are the padded inputs."""
    pairs = weight.shape[1] >> 1        # whole input pairs; an odd last input and the padding follow
    for b in prange(tiles.shape[0]):
        first = (b >> 1) * 16 + (b & 1) * features if gated else b * 16
        valid = max(0, min(16, features - (b >> 1) * 16 if gated else weight.shape[0] - first))
        tiles[b] = 0
        for p in range(pairs):          # 16 row streams in, one contiguous 64-byte row out
            for r in range(valid):
                tiles[b, p, r, 0] = bf16_bits(weight[first + r, 2 * p])
                tiles[b, p, r, 1] = bf16_bits(weight[first + r, 2 * p + 1])
        if weight.shape[1] & 1:
            for r in range(valid):
                tiles[b, pairs, r, 0] = bf16_bits(weight[first + r, 2 * pairs])


@dataclass(frozen=True)
class TileWeight:
    """A weight [outputs, inputs] in B-tile pair layout (see the module docstring)."""

    tiles: np.ndarray    # uint16 [outputs/16, inputs/2, 16, 2], both padded
    outputs: int

    @classmethod
    def pack(cls, weight: np.ndarray) -> "TileWeight":
        """float32 [O, I] -> bf16 (round to nearest even) in the layout, once per weight."""
        outputs, inputs = weight.shape
        tiles = np.empty((round_up(outputs, 32) // 16, round_up(inputs, 32) // 2, 16, 2), np.uint16)
        _weight_to_tiles(np.ascontiguousarray(weight, np.float32), tiles, outputs, False)
        return cls(tiles, outputs)

    @classmethod
    def pack_gated(cls, gate_up: np.ndarray) -> "TileWeight":
        """SwiGLU's stacked gate|up float32 [2F, I] -> the layout with gate and up rows interleaved
        by 16 (gate 0-15, up 0-15, gate 16-31, ...), F padded to 16 with zero rows: each 32-output
        block then holds 16 gate outputs and their 16 up outputs, for `swiglu`. `outputs` is F."""
        features, inputs = gate_up.shape[0] // 2, gate_up.shape[1]
        tiles = np.empty((2 * -(-features // 16), round_up(inputs, 32) // 2, 16, 2), np.uint16)
        _weight_to_tiles(np.ascontiguousarray(gate_up, np.float32), tiles, features, True)
        return cls(tiles, features)


def check_inputs(x: TileRows, weight: TileWeight) -> None:
    """x @ weight.T needs x's width to be weight's inputs."""
    if x.tiles.shape[1] * 16 != weight.tiles.shape[1]:
        raise ValueError(f"inputs differ: {x.tiles.shape[1] * 32} (padded) vs {weight.tiles.shape[1] * 2}")


# ---------------------------------------------------------------- the work split
@numba.njit(inline="always", nogil=True, cache=True)
def chunk_blocks(token_blocks, threads, most_blocks):
    """32-token blocks per work item: `most_blocks`, or fewer so that each of the `threads` has a
    chunk of its own."""
    return min(most_blocks, -(-token_blocks // threads))


@numba.njit(inline="always", nogil=True, cache=True)
def work_items(token_blocks, pairs, chunk, group_pairs):
    """How many work items cover `token_blocks` x `pairs` 32 x 32 blocks."""
    return -(-pairs // group_pairs) * -(-token_blocks // chunk)


@numba.njit(inline="always", nogil=True, cache=True)
def work_item(item, token_blocks, pairs, chunk, group_pairs):
    """Work item -> (its 32-token blocks, its 32-output blocks), for a prange over `work_items`."""
    groups = -(-pairs // group_pairs)
    first_block, group = item // groups * chunk, item % groups      # chunk-major
    return (range(first_block, min(first_block + chunk, token_blocks)),
            range(group * group_pairs, min((group + 1) * group_pairs, pairs)))


@numba.njit(inline="always", **JIT)   # fast-math as every other SiLU here
def write_swiglu_block(scratch, act, block, pair):
    """act's 32 tokens of `block` x 16 features of `pair` = bf16(silu(gate) * up), from a float32
    scratch [32, 32] holding those tokens' 16 gate outputs then their 16 up outputs (one 32-output
    block of a `TileWeight.pack_gated` weight)."""
    c, j0 = tile_position(16 * pair)
    for r in range(32):
        for j in range(16):
            act[2 * block + (r >> 4), c, r & 15, j0 + j] = bf16_bits(silu_times(scratch[r, j], scratch[r, 16 + j]))
