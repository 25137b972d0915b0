"""The one loop shape of the LLVM IR micro-kernels (`kernels.avx512_bf16`, `kernels.bf16_gemv`):
a counter from 0 and a set of vector accumulators carried around it, written once so that each
micro-kernel's code is only its loop body."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from llvmlite import ir

_I64 = ir.IntType(64)


def accumulate_loop(builder: ir.IRBuilder, name: str, trips, start: Sequence[ir.Value],
                    body: Callable[[ir.Value, list[ir.Value]], list[ir.Value]]) -> list[ir.Value]:
    """Run `body(counter, accumulators) -> new accumulators` for counter = 0 .. trips - 1 (at least
    once: the callers' trip counts are never 0), starting from `start`; return the final values,
    with the builder placed after the loop."""
    entry = builder.block
    loop, done = builder.append_basic_block(f"{name}_loop"), builder.append_basic_block(f"{name}_done")
    builder.branch(loop)
    builder.position_at_end(loop)
    counter = builder.phi(_I64)
    counter.add_incoming(ir.Constant(_I64, 0), entry)
    phis = [builder.phi(value.type) for value in start]
    for phi, value in zip(phis, start):
        phi.add_incoming(value, entry)
    values = body(counter, list(phis))
    following = builder.add(counter, ir.Constant(_I64, 1))
    counter.add_incoming(following, builder.block)
    for phi, value in zip(phis, values):
        phi.add_incoming(value, builder.block)
    builder.cbranch(builder.icmp_signed("<", following, trips), loop, done)
    builder.position_at_end(done)
    return values
