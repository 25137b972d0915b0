"""What NVRTC compiles for the CuPy backend: each CUDA source of `kernels/cuda/`, its options and
the template instances the backend launches.

Kept apart from `kernels.gpu`, which imports CuPy and needs a GPU, so that a machine with neither
can still compile every kernel exactly as the backend would (`tests/kernels/test_cuda_compile.py`,
NVRTC from the `test` extra). CI has no GPU; without this a CUDA syntax error or a template the
backend names but the source lacks would only show on the next GPU machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CUDA_DIR = Path(__file__).with_name("cuda")
NVRTC_OPTIONS = ("-std=c++17",)
ATTENTION_HEAD_DIMS = (64, 128)   # attention.cu's lanes split a row in float4s (D/4 lanes, D/32 dims)
# gemv.cu's (BT, ROWS): rows of x and output features per warp; the first tile that covers B wins.
# Measured on an H200: one feature per warp streams the weights fastest up to 8 rows of x; at 16
# the x loads dominate, and 4 features per warp reuse each of them 4 times (twice as fast there).
GEMV_SHAPES = ((1, 1), (2, 1), (4, 1), (8, 1), (16, 4))


@dataclass(frozen=True)
class CudaSource:
    """One file of kernels/cuda/ and the C++ name expressions (template instances) to build."""

    file: str
    templates: tuple[str, ...] = ()

    def code(self) -> str:
        return (CUDA_DIR / self.file).read_text()


def gemv_name(tile: int, rows: int) -> str:
    return f"gemv<{tile}, {rows}>"


ELEMENTWISE = CudaSource("elementwise.cu")
GEMV = CudaSource("gemv.cu", tuple(gemv_name(tile, rows) for tile, rows in GEMV_SHAPES))


def decode_attention_name(head_dim: int, group: int) -> str:
    return f"decode_attention<{head_dim}, {group}>"


def prefill_attention_name(head_dim: int, group: int) -> str:
    return f"prefill_attention<{head_dim}, {group}>"


def attention(head_dim: int, group: int) -> CudaSource:
    """attention.cu instantiated for head dim D and G query heads per KV head."""
    if head_dim not in ATTENTION_HEAD_DIMS:
        raise ValueError(f"the attention kernels take head dim 64 or 128, not {head_dim}")
    return CudaSource("attention.cu", (decode_attention_name(head_dim, group),
                                       prefill_attention_name(head_dim, group)))
