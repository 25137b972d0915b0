"""CuPy backend: the `Kernels` ops as CUDA kernels on one GPU, weights and KV cache resident there.

Why it is built this way:
- Every op has a numpy twin in `kernels.reference` and a parity test on random inputs
  (`tests/kernels/test_gpu_kernels.py`). The CUDA C lives in `kernels/cuda/*.cu`, compiled once per
  process by NVRTC through `cupy.RawModule` as `kernels.cuda_sources` says (which CI compiles
  without a GPU); the attention templates are instantiated for the head dim D and group size G a
  model has.
- `linear` runs our GEMV kernel (`gemv.cu`) for up to `GEMV_MAX_ROWS` rows (decode steps, short
  prompts) and cuBLAS above. For skinny products the GEMV streams the weights at memory speed with
  one launch, and unlike cuBLAS through CuPy it may run inside CUDA-graph stream capture: a decode
  step captured by `kernels.gpu_graph` therefore launches RawKernels only.
- Index arrays (token ids, positions, slots, block tables, lengths) arrive as host numpy and go up as
  int32 once per distinct content (`_index`), because the forward pass hands the same positions and
  block tables to all L layers. Device int32 arrays pass through untouched: that is how a captured
  step reads its static input buffers.
- Nothing comes back to the host inside a step except `argmax`'s token ids.
- Decode attention splits each context over `decode_splits` blocks (flash-decoding), chosen from
  shapes the host knows in a captured step too (batch size, block-table width), and merges the
  splits in the last block to finish, so a layer's attention is one launch.
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from typing import Any, Callable

import cupy
import numpy as np

from kernels import cuda_sources
from kernels.cuda_sources import GEMV_SHAPES, CudaSource
from kernels.interface import Array

THREADS = 256                 # block size of the elementwise kernels and the GEMV
GEMV_MAX_ROWS = 64            # linear: our GEMV up to this many rows of x, cuBLAS above
GEMV_WARPS = THREADS // 32
PREFILL_ROWS = 32             # query-head rows per prefill block (attention.cu's PREFILL_ROWS)
ATTENTION_THREADS = 128       # attention.cu's DECODE_WARPS * 32 and PREFILL_WARPS * 32
MAX_DECODE_SPLITS = 32        # attention.cu's MAX_SPLITS
MIN_SPLIT_TOKENS = 16         # shortest decode split: shorter ones lose more to the merge than they gain
UPLOAD_CACHE = 32             # distinct index arrays kept on the device (a step uses about 6)


def _device_index(device: str) -> int:
    kind, _, index = device.partition(":")
    if kind != "cuda":
        raise ValueError(f"GpuKernels runs on cuda or cuda:N, not {device!r}")
    return int(index or 0)


def _grid(n: int, per_block: int = THREADS) -> tuple[int]:
    return (max(1, -(-n // per_block)),)


def _compile(source: CudaSource) -> cupy.RawModule:
    """A source of kernels/cuda/, its templates instantiated as named (C++ name expressions)."""
    return cupy.RawModule(code=source.code(), options=cuda_sources.NVRTC_OPTIONS,
                          name_expressions=list(source.templates))


def _on_device(method: Callable) -> Callable:
    """Run the op with this backend's GPU current, so several backends can share a process."""
    @functools.wraps(method)
    def wrapper(self: "GpuKernels", *args: Any, **kwargs: Any) -> Any:
        with self.device:
            return method(self, *args, **kwargs)
    return wrapper


class GpuKernels:
    """The CuPy backend of one GPU ("cuda:N"); arrays it returns are cupy float32 arrays."""

    name = "cuda"

    def __init__(self, device: str = "cuda:0"):
        self.device = cupy.cuda.Device(_device_index(device))
        self.num_sms = int(self.device.attributes["MultiProcessorCount"])
        self._elementwise = _compile(cuda_sources.ELEMENTWISE)
        self._gemv = _compile(cuda_sources.GEMV)
        self._attention: dict[tuple[int, int], cupy.RawModule] = {}
        self._uploads: OrderedDict[tuple, cupy.ndarray] = OrderedDict()
        self._inv_freq: dict[tuple[int, float], cupy.ndarray] = {}
        self._split_counters: dict[int, cupy.ndarray] = {}
        self._functions: dict[tuple[int, str], cupy.RawKernel] = {}

    # ---------------------------------------------------------------- memory
    @_on_device
    def asarray(self, host: np.ndarray) -> Array:
        return cupy.asarray(np.ascontiguousarray(host))

    @_on_device
    def to_numpy(self, a: Array) -> np.ndarray:
        return cupy.asnumpy(a)

    @_on_device
    def zeros(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Array:
        return cupy.zeros(shape, dtype=dtype)

    @_on_device
    def move_blocks(self, src_cache: Array, dst_cache: Array, src_ids: np.ndarray, dst_ids: np.ndarray) -> None:
        """Blocks src_ids of src_cache -> blocks dst_ids of dst_cache (axis 1 of [L, N, P, Hkv, D])."""
        dst_cache[:, self._index(dst_ids)] = src_cache[:, self._index(src_ids)]

    def _kernel(self, module: cupy.RawModule, name: str) -> cupy.RawKernel:
        """A kernel of a module, looked up once (each lookup is a driver call)."""
        key = (id(module), name)
        if key not in self._functions:
            self._functions[key] = module.get_function(name)
        return self._functions[key]

    def _index(self, a: np.ndarray | cupy.ndarray) -> cupy.ndarray:
        """An int32 device copy of an index array, uploaded once per distinct content."""
        if isinstance(a, cupy.ndarray):
            return a if a.dtype == np.int32 else a.astype(np.int32)
        host = np.ascontiguousarray(a, dtype=np.int32)
        key = (host.shape, host.tobytes())
        device = self._uploads.pop(key, None)
        if device is None:
            device = cupy.asarray(host)
            if len(self._uploads) >= UPLOAD_CACHE:
                self._uploads.popitem(last=False)
        self._uploads[key] = device
        return device

    # ---------------------------------------------------------------- elementwise, norms, matmul
    @_on_device
    def embedding(self, table: Array, ids: np.ndarray) -> Array:
        """[V, E], [T] -> [T, E]"""
        ids = self._index(ids)
        num_tokens, width = len(ids), table.shape[1]
        out = cupy.empty((num_tokens, width), dtype=cupy.float32)
        self._kernel(self._elementwise, "embedding")(
            _grid(out.size), (THREADS,), (table, ids, out, np.int32(num_tokens), np.int32(width)))
        return out

    @_on_device
    def rms_norm(self, x: Array, weight: Array, eps: float) -> Array:
        """[T, E] -> [T, E]; one block per row."""
        x = _rows_of_float4(x)
        out = cupy.empty_like(x)
        self._kernel(self._elementwise, "rms_norm")(
            (x.shape[0],), _norm_block(x.shape[1]), (x, weight, out, np.int32(x.shape[1]), np.float32(eps)))
        return out

    @_on_device
    def add_rms_norm(self, residual: Array, delta: Array, weight: Array, eps: float) -> tuple[Array, Array]:
        """[T, E] x2 -> (residual + delta, its rms_norm), one pass over the rows."""
        residual, delta = _rows_of_float4(residual), _rows_of_float4(delta)
        summed, normed = cupy.empty_like(residual), cupy.empty_like(residual)
        self._kernel(self._elementwise, "add_rms_norm")(
            (residual.shape[0],), _norm_block(residual.shape[1]),
            (residual, delta, weight, summed, normed, np.int32(residual.shape[1]), np.float32(eps)))
        return summed, normed

    @_on_device
    def linear(self, x: Array, weight: Array) -> Array:
        """[T, I], [O, I] -> [T, O]: GEMV kernel for skinny x, cuBLAS otherwise."""
        x = cupy.ascontiguousarray(x)
        rows, cols = x.shape
        features = weight.shape[0]
        aligned = cols % 4 == 0 and x.data.ptr % 16 == 0 and weight.data.ptr % 16 == 0
        if rows > GEMV_MAX_ROWS or not aligned or not weight.flags.c_contiguous:
            return x @ weight.T
        tile, per_warp = next((shape for shape in GEMV_SHAPES if shape[0] >= rows), GEMV_SHAPES[-1])
        out = cupy.empty((rows, features), dtype=cupy.float32)
        grid = (-(-rows // tile), -(-features // (per_warp * GEMV_WARPS)))
        self._kernel(self._gemv, cuda_sources.gemv_name(tile, per_warp))(
            grid, (THREADS,), (x, weight, out, np.int32(rows), np.int32(cols), np.int32(features)))
        return out

    @_on_device
    def rope(self, x: Array, positions: np.ndarray, theta: float) -> Array:
        """[T, H, D] (any row and head strides, contiguous D) -> [T, H, D] contiguous."""
        num_tokens, heads, head_dim = x.shape
        stride_t, stride_h = _element_strides(x)
        out = cupy.empty((num_tokens, heads, head_dim), dtype=cupy.float32)
        self._kernel(self._elementwise, "rope")(
            _grid(num_tokens * heads * (head_dim // 2)), (THREADS,),
            (x, self._index(positions), self._inverse_frequencies(head_dim, theta), out, np.int32(num_tokens),
             np.int32(heads), np.int32(head_dim), np.int64(stride_t), np.int64(stride_h)))
        return out

    def _inverse_frequencies(self, head_dim: int, theta: float) -> cupy.ndarray:
        """RoPE's [D/2] float64 inverse frequencies on the device, uploaded once: constant per model,
        so safe to bake into a captured graph."""
        key = (head_dim, float(theta))
        if key not in self._inv_freq:
            self._inv_freq[key] = cupy.asarray(rope_inverse_frequencies(head_dim, theta))
        return self._inv_freq[key]

    @_on_device
    def silu_mul(self, gate_up: Array) -> Array:
        """[T, 2F] -> [T, F]"""
        gate_up = cupy.ascontiguousarray(gate_up)
        num_tokens, width = gate_up.shape[0], gate_up.shape[1] // 2
        out = cupy.empty((num_tokens, width), dtype=cupy.float32)
        self._kernel(self._elementwise, "silu_mul")(
            _grid(out.size), (THREADS,), (gate_up, out, np.int32(num_tokens), np.int32(width)))
        return out

    def mlp(self, x: Array, gate_up: Array, down: Array) -> Array:
        """[T, E] -> [T, E]: the SwiGLU MLP as its three kernels (SiLU in the gate/up GEMV's epilogue
        is one of the fusions docs/benchmarks_gpu.md plans)."""
        return self.linear(self.silu_mul(self.linear(x, gate_up)), down)

    # ---------------------------------------------------------------- paged KV cache and attention
    @_on_device
    def write_kv(self, k_cache: Array, v_cache: Array, k: Array, v: Array, slot_mapping: np.ndarray) -> None:
        """k, v [T, Hkv, D] (any row and head strides) -> caches [N, P, Hkv, D]; slot -1 writes nothing."""
        num_tokens, kv_heads, head_dim = k.shape
        self._kernel(self._elementwise, "write_kv")(
            _grid(num_tokens * kv_heads * head_dim), (THREADS,),
            (k_cache, v_cache, k, v, self._index(slot_mapping), np.int32(num_tokens), np.int32(kv_heads),
             np.int32(head_dim), *map(np.int64, _element_strides(k)), *map(np.int64, _element_strides(v))))

    @_on_device
    def rope_write_kv(self, q: Array, k: Array, v: Array, positions: np.ndarray, theta: float,
                      k_cache: Array, v_cache: Array, slot_mapping: np.ndarray) -> Array:
        """q [T, H, D] rotated (returned, contiguous); k [T, Hkv, D] rotated and stored with v in the
        caches, slot -1 storing nothing: one launch instead of rope, rope and write_kv (q, k, v are
        views of the qkv product, any row and head strides)."""
        num_tokens, heads, head_dim = q.shape
        kv_heads = k.shape[1]
        out = cupy.empty((num_tokens, heads, head_dim), dtype=cupy.float32)
        strides = (*_element_strides(q), *_element_strides(k), *_element_strides(v))
        self._kernel(self._elementwise, "rope_write_kv")(
            _grid(num_tokens * (heads + kv_heads) * (head_dim // 2)), (THREADS,),
            (q, k, v, self._index(positions), self._inverse_frequencies(head_dim, theta), out, k_cache, v_cache,
             self._index(slot_mapping), np.int32(num_tokens), np.int32(heads), np.int32(kv_heads),
             np.int32(head_dim), *map(np.int64, strides)))
        return out

    def decode_splits(self, batch: int, kv_heads: int, max_context: int) -> int:
        """Blocks per (sequence, KV head) in decode attention: enough for about two per SM, since a
        batch-1 step would otherwise read each layer's cache with Hkv blocks, but no split shorter
        than MIN_SPLIT_TOKENS. `max_context` is the block tables' capacity (M * P): known on the
        host even when the lengths live on the device, as in a captured step."""
        fill = math.ceil(2 * self.num_sms / (batch * kv_heads))
        return max(1, min(MAX_DECODE_SPLITS, fill, math.ceil(max_context / MIN_SPLIT_TOKENS)))

    @_on_device
    def decode_attention(self, q: Array, k_cache: Array, v_cache: Array, block_tables: np.ndarray,
                         context_lens: np.ndarray, scale: float) -> Array:
        """q [B, H, D], one query per sequence at the last of its context_lens[b] tokens -> [B, H, D]."""
        q = cupy.ascontiguousarray(q)
        batch, heads, head_dim = q.shape
        _, block_tokens, kv_heads, _ = k_cache.shape
        module = self._attention_module(head_dim, heads // kv_heads)
        tables = self._index(block_tables)
        splits = self.decode_splits(batch, kv_heads, tables.shape[1] * block_tokens)
        out = cupy.empty_like(q)
        part_acc = cupy.empty((batch, heads, splits, head_dim), dtype=cupy.float32) if splits > 1 else out
        part_ml = cupy.empty((batch, heads, splits, 2), dtype=cupy.float32) if splits > 1 else out
        self._kernel(module, cuda_sources.decode_attention_name(head_dim, heads // kv_heads))(
            (splits, kv_heads, batch), (ATTENTION_THREADS,),
            (q, k_cache, v_cache, tables, self._index(context_lens), out, part_acc, part_ml,
             self._counters(batch * kv_heads), np.int32(tables.shape[1]), np.int32(block_tokens),
             np.int32(kv_heads), np.float32(scale)))
        return out

    def _counters(self, count: int) -> cupy.ndarray:
        """Zeroed int32 counters for decode attention's last-block merge, at least `count` of them.
        The kernel leaves them at zero, so one buffer per size serves every launch; none is ever
        freed, because a captured graph keeps the address of the one it saw."""
        size = 1 << (count - 1).bit_length()
        if size not in self._split_counters:
            self._split_counters[size] = cupy.zeros(size, dtype=cupy.int32)
        return self._split_counters[size]

    @_on_device
    def prefill_attention(self, q: Array, k_cache: Array, v_cache: Array, block_tables: np.ndarray,
                          query_start: np.ndarray, context_lens: np.ndarray, scale: float) -> Array:
        """q [T, H, D] packed over B sequences (host query_start [B + 1], context_lens [B]) -> [T, H, D].
        Causal: query i of sequence b sits at position context_lens[b] - q_len + i."""
        q = cupy.ascontiguousarray(q)
        _, heads, head_dim = q.shape
        _, block_tokens, kv_heads, _ = k_cache.shape
        group = heads // kv_heads
        if group > PREFILL_ROWS:
            raise ValueError(f"prefill attention serves at most {PREFILL_ROWS} query heads per KV head, not {group}")
        module = self._attention_module(head_dim, group)
        tile_seq, tile_q0 = _query_tiles(np.asarray(query_start), PREFILL_ROWS // group)
        tables = self._index(block_tables)
        out = cupy.empty_like(q)
        kernel = self._kernel(module, cuda_sources.prefill_attention_name(head_dim, group))
        kernel((len(tile_seq), kv_heads), (ATTENTION_THREADS,),
               (q, k_cache, v_cache, tables, self._index(query_start), self._index(context_lens),
                self._index(tile_seq), self._index(tile_q0), out, np.int32(tables.shape[1]),
                np.int32(block_tokens), np.int32(kv_heads), np.float32(scale)),
               shared_mem=_prefill_shared_bytes(head_dim))
        return out

    def _attention_module(self, head_dim: int, group: int) -> cupy.RawModule:
        """attention.cu instantiated for (D, G), compiled on first use."""
        key = (head_dim, group)
        if key not in self._attention:
            module = _compile(cuda_sources.attention(head_dim, group))
            prefill = self._kernel(module, cuda_sources.prefill_attention_name(head_dim, group))
            prefill.max_dynamic_shared_size_bytes = _prefill_shared_bytes(head_dim)  # opt in above 48 KiB
            self._attention[key] = module
        return self._attention[key]

    # ---------------------------------------------------------------- sampling
    @_on_device
    def argmax(self, logits: Array) -> np.ndarray:
        """[B, V] -> host [B] int64: the step's one device-to-host copy."""
        logits = cupy.ascontiguousarray(logits)
        ids = cupy.empty(logits.shape[0], dtype=cupy.int32)
        self._kernel(self._elementwise, "argmax_rows")(
            (logits.shape[0],), (1024,), (logits, ids, np.int32(logits.shape[1])))
        return ids.get().astype(np.int64)


def rope_inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """[D/2] float64: exactly reference.rope_angles' inv_freq."""
    return theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def _rows_of_float4(x: Array) -> Array:
    """x as contiguous rows that the norm kernels may read in 16-byte float4 loads."""
    x = cupy.ascontiguousarray(x)
    if x.shape[-1] % 4 or x.data.ptr % 16:
        raise ValueError(f"the norm kernels need rows of a multiple of 4 floats, 16-byte aligned; got {x.shape}")
    return x


def _norm_block(width: int) -> tuple[int]:
    """One thread per float4 of a row, in whole warps, at most 1024."""
    return (min(1024, 32 * -(-width // 128)),)


def _element_strides(x: Array) -> tuple[int, int]:
    """Row and head strides, in elements, of a [T, heads, D] view whose last axis is contiguous."""
    if x.strides[2] != x.itemsize:
        raise ValueError("the head dim must be contiguous")
    return x.strides[0] // x.itemsize, x.strides[1] // x.itemsize


def _query_tiles(query_start: np.ndarray, per_tile: int) -> tuple[np.ndarray, np.ndarray]:
    """The prefill grid: for each tile, its sequence and its first query (within the sequence)."""
    counts = -(-np.diff(query_start) // per_tile)
    tile_seq = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    first_tile = np.repeat(np.cumsum(counts) - counts, counts)
    tile_q0 = (np.arange(len(tile_seq)) - first_tile) * per_tile
    return tile_seq, tile_q0.astype(np.int32)


def _prefill_shared_bytes(head_dim: int, key_tile: int = 32) -> int:
    """q [ROWS, D] + keys [D, KEY_TILE] + values [KEY_TILE, D] + probabilities [ROWS, KEY_TILE]."""
    return 4 * (PREFILL_ROWS * head_dim + 2 * key_tile * head_dim + PREFILL_ROWS * key_tile)
