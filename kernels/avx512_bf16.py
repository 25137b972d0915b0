"""The 32 x 32 block product of the bf16 prefill kernels (`kernels.bf16_gemm`, the bf16 prompt
attention) on AVX512-BF16's dot-product instruction, for CPUs that have it but no AMX (AMD Zen 4 and
later; Intel Cooper Lake): bf16 inputs, float32 accumulation and output, the same call and the same
results as the AMX tiles' (`kernels.amx_tiles.product_block`), on the same operand layouts
(`kernels.bf16_layout`).

`vdpbf16ps acc, a, b` adds to each of 16 float32 lanes the products of one pair of bf16s from a and
b: 32 multiply-adds, twice a float32 FMA's 16, from registers of the same width. A 64-byte row of
16 x 2 bf16 of `TileWeight` is exactly one b operand (16 outputs x one input pair); one row's input
pair, one 32-bit word broadcast to all lanes, is the a operand. The micro-kernel (`_dot_rows`)
keeps 8 rows x 32 outputs in 16 accumulator registers for the whole input width: per input pair,
two weight loads, eight broadcasts and sixteen dot products, so the multiplies, not the loads,
bound it. Numba has no vector values, so the micro-kernel is one intrinsic that emits its loop in
LLVM IR (Numba's JIT assembles no inline asm, so it calls LLVM's `llvm.x86.avx512bf16.dpbf16ps.512`,
whose operands are bfloat vectors: `_BFloat` declares the type llvmlite lacks). On the Zen 4 VM of
docs/benchmarks_cpu_kernels.md (2 cores) 30 layers' GEMMs of the SmolLM2 shapes ran 2.2-2.8x faster
than float32 BLAS (OpenBLAS) on the same cores.

The instruction exists only where the CPU reports `avx512_bf16`; kernels compile on first use, so
importing this module anywhere is safe.
"""
from __future__ import annotations

from llvmlite import ir
import numba
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels.cpu_pool import cpu_info
from kernels.ir_loop import accumulate_loop

ROWS = 8             # rows per micro-kernel call: 8 x 2 accumulators, of Zen 4's 32 vector registers


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


def _dot_rows_intrinsic(accumulate: bool):
    """The micro-kernel as a Numba intrinsic: float32 [ROWS, 32] at byte address c (rows
    `c_row_bytes` apart) = (`accumulate`: +=) ROWS rows of bf16 inputs from address a, rows
    `a_stride` bytes apart, each next 32 inputs `a_step` bytes on (`TileRows`: 64 and 1 KiB; a
    row-major matrix: its row bytes and 64) @ 32 outputs of `TileWeight` pair rows from address b
    (outputs 16-31 `b_half` bytes on, each next 32 inputs 1 KiB on), over k_tiles x 32 inputs."""
    def typer(typingctx, a, a_stride, a_step, b, b_half, k_tiles, c, c_row_bytes):
        def codegen(context, builder, signature, args):
            a, a_stride, a_step, b, b_half, k_tiles, c, c_row_bytes = args
            dot = cgutils.get_or_insert_function(builder.module,
                                                 ir.FunctionType(_F32X16, [_F32X16, _BF16X32, _BF16X32]),
                                                 "llvm.x86.avx512bf16.dpbf16ps.512")
            outputs = [[builder.add(builder.add(c, builder.mul(c_row_bytes, ir.Constant(_I64, r))),
                                    ir.Constant(_I64, 64 * half)) for half in range(2)] for r in range(ROWS)]
            if accumulate:
                start = [_load(builder, address, 0, _F32X16) for row in outputs for address in row]
            else:
                start = [ir.Constant(_F32X16, [0.0] * 16)] * (2 * ROWS)
            rows = [builder.add(a, builder.mul(a_stride, ir.Constant(_I64, r))) for r in range(ROWS)]

            def step(k, acc):                            # 32 inputs: one tile's width
                a_offset, b_tile = builder.mul(k, a_step), builder.add(b, builder.mul(k, ir.Constant(_I64, 1024)))
                b_tiles = (b_tile, builder.add(b_tile, b_half))
                for pair in range(16):                   # the 16 input pairs of this 32-input step
                    weights = [builder.bitcast(_load(builder, t, 64 * pair, _I32X16), _BF16X32) for t in b_tiles]
                    for r in range(ROWS):
                        word = _load(builder, builder.add(rows[r], a_offset), 4 * pair, _I32)
                        inputs = builder.bitcast(_broadcast(builder, word), _BF16X32)
                        for half in range(2):
                            acc[2 * r + half] = builder.call(dot, [acc[2 * r + half], inputs, weights[half]])
                return acc

            acc = accumulate_loop(builder, "dot_rows", k_tiles, start, step)
            for r in range(ROWS):
                for half in range(2):
                    builder.store(acc[2 * r + half], builder.inttoptr(outputs[r][half], _F32X16.as_pointer()), align=4)
            return context.get_dummy_value()
        return types.void(*[types.intp] * 8), codegen
    typer.__name__ = typer.__qualname__ = "_dot_rows_add" if accumulate else "_dot_rows"
    return intrinsic(typer)


_dot_rows, _dot_rows_add = _dot_rows_intrinsic(False), _dot_rows_intrinsic(True)


@numba.njit(inline="always", nogil=True, cache=True)
def begin_blocks():
    """Nothing to set up (the AMX tiles need their shapes: `kernels.amx_tiles.begin_blocks`)."""


@numba.njit(inline="always", nogil=True, cache=True)
def end_blocks():
    """Nothing to release."""


@numba.njit(inline="always", nogil=True, cache=True)
def _rows_blocks(a0, a1, b0, b1, k_tiles, a_stride, a_step, c, c_row_bytes, accumulate):
    """`product_block` (`accumulate`: added to c) as four micro-kernel calls of 8 rows."""
    for quarter in range(32 // ROWS):
        a = (a0 if quarter < 16 // ROWS else a1) + (quarter * ROWS & 15) * a_stride
        out = c + quarter * ROWS * c_row_bytes
        if accumulate:
            _dot_rows_add(a, a_stride, a_step, b0, b1 - b0, k_tiles, out, c_row_bytes)
        else:
            _dot_rows(a, a_stride, a_step, b0, b1 - b0, k_tiles, out, c_row_bytes)


@numba.njit(inline="always", nogil=True, cache=True)
def product_block(a0, a1, b0, b1, k_tiles, a_stride, a_step, c, c_row_bytes):
    """The 32 x 32 float32 block at address c (rows `c_row_bytes` apart) = A @ B, A's rows 0-15
    from a0 and 16-31 from a1 (`_dot_rows` for a_stride, a_step), B's outputs 0-15 from b0 and
    16-31 from b1 (`TileWeight` pair rows). The AMX kernel has the same call."""
    _rows_blocks(a0, a1, b0, b1, k_tiles, a_stride, a_step, c, c_row_bytes, False)


@numba.njit(inline="always", nogil=True, cache=True)
def add_product_block(a0, a1, b0, b1, k_tiles, a_stride, a_step, c, c_row_bytes):
    """`product_block`, added to the block at c instead of written over it."""
    _rows_blocks(a0, a1, b0, b1, k_tiles, a_stride, a_step, c, c_row_bytes, True)
