"""CUDA-graph replay of decode steps: one captured graph per (batch bucket, block-table width).

Why: a decode step of SmolLM2-135M launches about 350 small kernels, and from Python each launch
costs more than the kernel runs, so eager decode at small batch is launch-bound. Captured once, the
step replays with a single `cudaGraphLaunch`.

How, without the model knowing:
- `GraphedDecodeModel` wraps a model (anything with `.forward(step, k_cache, v_cache)`, `.kernels`
  and `.config`, i.e. `models.llama.LlamaModel` on `GpuKernels`) and is handed to `Instance` in its
  place. Prefill steps, observed steps and batches above `MAX_BATCH` go straight to `model.forward`.
- A decode step of B sequences whose block tables are M wide replays the graph of bucket
  (Bb >= B, Mb >= M), both powers of two: its index arrays are copied into that graph's static
  inputs (one host-to-device copy from pinned memory), the graph replays, and the first B rows of
  its static logits come back (valid until the next step).
- The graph is captured by running `model.forward` itself on a copy of the step whose index arrays
  are those static device buffers: `GpuKernels` passes device index arrays through untouched and
  runs skinny products on its GEMV kernel, since CuPy refuses cuBLAS inside stream capture.
- Padding rows (B < Bb) get slot -1 (the KV write skips them) and context length 0 (attention writes
  zeros), so they touch no sequence's cache.
- Captured intermediates come from a private memory pool that lives as long as this object: a replay
  writes to the very addresses of the capture, so no other array may ever be handed those blocks.
- A graph bakes in the KV cache's addresses; when a resize swaps the cache arrays the graphs are
  dropped and recaptured on demand.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import cupy
import numpy as np

from kernels.gpu import GEMV_MAX_ROWS
from kernels.interface import Array
from kernels.model_wrapper import ModelWrapper

MAX_BATCH = GEMV_MAX_ROWS  # above it `linear` would call cuBLAS, which capture refuses
MIN_TABLE_WIDTH = 8
_PADDING = {"token_ids": 0, "positions": 0, "slot_mapping": -1, "context_lens": 0, "block_tables": -1}


def _bucket(n: int, floor: int = 1) -> int:
    return 1 << (max(n, floor) - 1).bit_length()


class _StaticInputs:
    """A graph's step inputs (int32): views into one pinned host buffer and into its device twin."""

    def __init__(self, batch: int, width: int):
        shapes = {"token_ids": (batch,), "positions": (batch,), "slot_mapping": (batch,),
                  "query_start": (batch + 1,), "context_lens": (batch,), "block_tables": (batch, width)}
        total = sum(math.prod(shape) for shape in shapes.values())
        self._pinned = cupy.cuda.alloc_pinned_memory(4 * total)
        self._host_buffer = np.frombuffer(self._pinned, dtype=np.int32, count=total)
        self._device_buffer = cupy.empty(total, dtype=cupy.int32)
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, cupy.ndarray] = {}
        offset = 0
        for name, shape in shapes.items():
            size = math.prod(shape)
            self.host[name] = self._host_buffer[offset:offset + size].reshape(shape)
            self.device[name] = self._device_buffer[offset:offset + size].reshape(shape)
            offset += size
        self._uploaded: cupy.cuda.Event | None = None

    def load(self, step: Any, stream: cupy.cuda.Stream) -> None:
        """Copy a decode step of B <= batch sequences in, padding the rows past B."""
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the previous copy has left the pinned buffer
        batch = len(step.context_lens)
        for name, value in _PADDING.items():
            self.host[name].fill(value)
        self.host["query_start"][:] = np.arange(len(self.host["query_start"]))
        for name in ("token_ids", "positions", "slot_mapping", "context_lens"):
            self.host[name][:batch] = getattr(step, name)
        self.host["block_tables"][:batch, :step.block_tables.shape[1]] = step.block_tables
        self._device_buffer.set(self._host_buffer, stream=stream)
        self._uploaded = stream.record()


@dataclass
class _DecodeGraph:
    graph: cupy.cuda.Graph
    inputs: _StaticInputs
    logits: cupy.ndarray  # [Bb, V], rewritten by every replay


class GraphedDecodeModel(ModelWrapper):
    """A model whose decode steps replay CUDA graphs; everything else is the wrapped model's."""

    def __init__(self, model: Any, max_batch: int = MAX_BATCH):
        if max_batch > MAX_BATCH:
            raise ValueError(f"decode steps of more than {MAX_BATCH} sequences cannot be captured")
        super().__init__(model)
        self.max_batch = max_batch
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self._cache_addresses: tuple[int, int] | None = None
        self._pool = cupy.cuda.MemoryPool()
        with model.kernels.device:
            self._stream = cupy.cuda.Stream()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def forward(self, step: Any, k_cache: Array, v_cache: Array,
                observe: Callable[[str, Array], None] | None = None) -> Array:
        """`model.forward`, replayed from a graph for decode steps of up to max_batch sequences."""
        batch = len(step.context_lens)
        if step.is_prefill or observe is not None or batch > self.max_batch:
            return self.model.forward(step, k_cache, v_cache, observe)
        with self.model.kernels.device:
            captured = self._graph_for(step, k_cache, v_cache)
            captured.inputs.load(step, self._stream)
            captured.graph.launch(stream=self._stream)
        return captured.logits[:batch]

    def _graph_for(self, step: Any, k_cache: Array, v_cache: Array) -> _DecodeGraph:
        addresses = (k_cache.data.ptr, v_cache.data.ptr)
        if addresses != self._cache_addresses:  # a new cache: the old graphs write to freed memory
            self._graphs.clear()
            self._cache_addresses = addresses
        key = (_bucket(len(step.context_lens)), _bucket(step.block_tables.shape[1], MIN_TABLE_WIDTH))
        if key not in self._graphs:
            self._graphs[key] = self._capture(*key, step, k_cache, v_cache)
        return self._graphs[key]

    def _capture(self, batch: int, width: int, step: Any, k_cache: Array, v_cache: Array) -> _DecodeGraph:
        inputs = _StaticInputs(batch, width)
        static_step = dataclasses.replace(step, **inputs.device)
        inputs.load(step, self._stream)
        with self._stream:
            # an eager run first compiles and loads every kernel, which capture must not do; it
            # computes this very step, so writing its keys and values twice changes nothing
            self.model.forward(static_step, k_cache, v_cache)
            with cupy.cuda.using_allocator(self._pool.malloc):
                self._stream.begin_capture()
                try:
                    logits = self.model.forward(static_step, k_cache, v_cache)
                finally:
                    graph = self._stream.end_capture()
        return _DecodeGraph(graph, inputs, logits)
