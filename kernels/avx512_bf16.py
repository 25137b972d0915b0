"""Our bf16 GEMM on AVX512-BF16's dot-product instruction, for the layer GEMMs of a prefill on CPUs
that have it but no AMX (AMD Zen 4 and later; Intel Cooper Lake): x @ W.T with bf16 inputs and
float32 accumulation and output, the same results as the AMX kernel (`kernels.amx_tiles`) computes,
on the same operand layouts (`kernels.bf16_layout`).

`vdpbf16ps acc, a, b` adds to each of 16 float32 lanes the products of one pair of bf16s from a and
b: 32 multiply-adds, twice a float32 FMA's 16, from registers of the same width. A row of 16 x 2
bf16 of `TileWeight` is exactly one b operand (16 outputs x one input pair); one token's input pair
from `TileRows`, one 32-bit word broadcast to all lanes, is the a operand. The micro-kernel
(`_dot_rows`) keeps 8 tokens x 32 outputs in 16 accumulator registers for the whole input width:
per input pair, two weight loads, eight broadcasts and sixteen dot products, so the multiplies, not
the loads, bound it. Numba has no vector values, so the micro-kernel is one intrinsic that emits
its loop in LLVM IR (Numba's JIT assembles no inline asm, so it calls LLVM's
`llvm.x86.avx512bf16.dpbf16ps.512`, whose operands are bfloat vectors: `_BFloat` declares the type
llvmlite lacks).

Work split as the AMX kernel's (`kernels.bf16_layout`): each 32 x 32 output block is four
micro-kernel calls. On the Zen 4 VM of docs/benchmarks_cpu_kernels.md (2 cores) the GEMMs of the
SmolLM2 shapes ran at 4x float32 BLAS (OpenBLAS) on the same cores (see there for the figures).

The instruction exists only where the CPU reports `avx512_bf16`; this module compiles its kernels
on first use, so importing it anywhere is safe.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels.bf16_layout import TileRows, TileWeight, check_inputs, chunk_blocks, work_item, work_items, write_swiglu_block
from kernels.cpu_math import JIT
from kernels.cpu_pool import cpu_info

ROWS = 8             # tokens per micro-kernel call: 8 x 2 accumulators, of Zen 4's 32 vector registers
GROUP_PAIRS = 3      # 32-output blocks per work item
CHUNK_BLOCKS = 16    # 32-token blocks per work item


def cpu_has_avx512_bf16() -> bool:
    return "avx512_bf16" in cpu_info("flags").split()


# ---------------------------------------------------------------- the micro-kernel, in LLVM IR
class _BFloat(ir.types._BaseFloatType):
    """LLVM's `bfloat`, the element type of the dot-product intrinsic's operands."""

    null = "0.0"
    intrinsic_name = "bf16"

    def __str__(self) -> str:
        return "bfloat"


_BFloat._create_instance()
_I32, _I64 = ir.IntType(32), ir.IntType(64)
_F32X16, _I32X16, _BF16X32 = ir.VectorType(ir.FloatType(), 16), ir.VectorType(_I32, 16), ir.VectorType(_BFloat(), 32)


def _load(builder, address, offset: int, element):
    """The `element` at byte address + offset (no alignment assumed: numpy gives 16 bytes at most)."""
    pointer = builder.inttoptr(builder.add(address, ir.Constant(_I64, offset)), element.as_pointer())
    return builder.load(pointer, align=4)


def _broadcast(builder, word):
    """A 32-bit word in all 16 lanes."""
    lane0 = builder.insert_element(ir.Constant(_I32X16, ir.Undefined), word, ir.Constant(_I32, 0))
    return builder.shuffle_vector(lane0, ir.Constant(_I32X16, ir.Undefined), ir.Constant(_I32X16, [0] * 16))


@intrinsic
def _dot_rows(typingctx, a, b, b_half, c, c_row_bytes, k_tiles):
    """Float32 [ROWS, 32] at byte address c (rows `c_row_bytes` apart) = ROWS tokens of `TileRows`
    from address a (a tile's row r, 64 bytes per token) @ 32 outputs of `TileWeight` from address b
    (outputs 16-31 `b_half` bytes on), over k_tiles x 32 inputs; both step 1 KiB per 32 inputs."""
    def codegen(context, builder, signature, args):
        a, b, b_half, c, c_row_bytes, k_tiles = args
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32X16, [_F32X16, _BF16X32, _BF16X32]),
                                             "llvm.x86.avx512bf16.dpbf16ps.512")
        entry = builder.block
        loop, done = builder.append_basic_block("dot_rows_loop"), builder.append_basic_block("dot_rows_done")
        builder.branch(loop)
        builder.position_at_end(loop)
        k = builder.phi(_I64)
        k.add_incoming(ir.Constant(_I64, 0), entry)
        phis = [builder.phi(_F32X16) for _ in range(2 * ROWS)]
        for phi in phis:
            phi.add_incoming(ir.Constant(_F32X16, [0.0] * 16), entry)
        acc = list(phis)
        offset = builder.mul(k, ir.Constant(_I64, 1024))
        a_tile, b_tile = builder.add(a, offset), builder.add(b, offset)
        b_tiles = (b_tile, builder.add(b_tile, b_half))
        for pair in range(16):                       # the 16 input pairs of this 32-input tile
            weights = [builder.bitcast(_load(builder, t, 64 * pair, _I32X16), _BF16X32) for t in b_tiles]
            for r in range(ROWS):
                inputs = builder.bitcast(_broadcast(builder, _load(builder, a_tile, 64 * r + 4 * pair, _I32)), _BF16X32)
                for half in range(2):
                    acc[2 * r + half] = builder.call(dot, [acc[2 * r + half], inputs, weights[half]])
        k_next = builder.add(k, ir.Constant(_I64, 1))
        k.add_incoming(k_next, loop)
        for phi, value in zip(phis, acc):
            phi.add_incoming(value, loop)
        builder.cbranch(builder.icmp_signed("<", k_next, k_tiles), loop, done)
        builder.position_at_end(done)
        for r in range(ROWS):
            row = builder.add(c, builder.mul(c_row_bytes, ir.Constant(_I64, r)))
            for half in range(2):
                pointer = builder.inttoptr(builder.add(row, ir.Constant(_I64, 64 * half)), _F32X16.as_pointer())
                builder.store(acc[2 * r + half], pointer, align=4)
        return context.get_dummy_value()
    return types.void(types.intp, types.intp, types.intp, types.intp, types.intp, types.intp), codegen


@numba.njit(inline="always", nogil=True, cache=True)
def _product_block(a, b, block, pair, block_bytes, k_tiles, c, c_row_bytes):
    """The 32 x 32 float32 block of A @ B for 32-token block `block` and 32-output block `pair`, into
    rows `c_row_bytes` apart from address c: four micro-kernel calls of 8 tokens."""
    b0 = b + 2 * pair * block_bytes
    for quarter in range(32 // ROWS):
        rows = block * 32 + quarter * ROWS       # a 16-token tile block holds two calls' rows
        a0 = a + (rows >> 4) * block_bytes + (rows & 15) * 64
        _dot_rows(a0, b0, block_bytes, c + quarter * ROWS * c_row_bytes, c_row_bytes, k_tiles)


@numba.njit(parallel=True, nogil=True, cache=True)
def _dot_matmul(a, b, out, threads):
    """out [T, O] (T, O padded to 32) = A @ B with a [T/16, I/32, 16, 32] and b [O/16, I/2, 16, 2]."""
    k_tiles = a.shape[1]
    token_blocks, pairs = out.shape[0] // 32, out.shape[1] // 32
    row_bytes = out.shape[1] * 4
    block_bytes = k_tiles * 1024
    chunk = chunk_blocks(token_blocks, threads, CHUNK_BLOCKS)
    for item in prange(work_items(token_blocks, pairs, chunk, GROUP_PAIRS)):
        blocks, outputs = work_item(item, token_blocks, pairs, chunk, GROUP_PAIRS)
        for block in blocks:
            for pair in outputs:
                _product_block(a.ctypes.data, b.ctypes.data, block, pair, block_bytes, k_tiles,
                               out.ctypes.data + block * 32 * row_bytes + pair * 128, row_bytes)


@numba.njit(parallel=True, **JIT)
def _dot_swiglu(a, b, act, threads):
    """act (A-tile layout) = silu(gate) * up of A @ B, b the interleaved gate|up of
    `TileWeight.pack_gated`; each 32 x 32 block passes through a 4 KiB scratch, never memory."""
    k_tiles = a.shape[1]
    token_blocks, pairs = a.shape[0] // 2, b.shape[0] // 2
    block_bytes = k_tiles * 1024
    chunk = chunk_blocks(token_blocks, threads, CHUNK_BLOCKS)
    for item in prange(work_items(token_blocks, pairs, chunk, GROUP_PAIRS)):
        scratch = np.empty((32, 32), np.float32)
        blocks, outputs = work_item(item, token_blocks, pairs, chunk, GROUP_PAIRS)
        for block in blocks:
            for pair in outputs:
                _product_block(a.ctypes.data, b.ctypes.data, block, pair, block_bytes, k_tiles, scratch.ctypes.data, 128)
                write_swiglu_block(scratch, act, block, pair)


def matmul(x: TileRows, weight: TileWeight) -> np.ndarray:
    """x @ weight.T, float32 [x.rows, weight.outputs]: a view of the padded result."""
    check_inputs(x, weight)
    out = np.empty((x.tiles.shape[0] * 16, weight.tiles.shape[0] * 16), np.float32)
    _dot_matmul(x.tiles, weight.tiles, out, numba.get_num_threads())
    return out[:x.rows, :weight.outputs]


def swiglu(x: TileRows, gate_up: TileWeight) -> TileRows:
    """silu(x @ gate.T) * (x @ up.T) in bf16 tile layout, for a weight packed by `pack_gated`."""
    check_inputs(x, gate_up)
    act = TileRows.empty(x.rows, gate_up.outputs)
    _dot_swiglu(x.tiles, gate_up.tiles, act.tiles, numba.get_num_threads())
    return act
