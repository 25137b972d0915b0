"""The store's GPU path: pinned host buffers, chunk copies pipelined with the reads, the weights equal
to the checkpoint's, and execute-while-load on the GPU equal to a fully loaded model."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="needs CUDA and CuPy: cupy is not installed")
if not cupy.is_available():
    pytest.skip("needs CUDA and CuPy: no CUDA device is visible", allow_module_level=True)

from kernels.gpu import GpuKernels  # noqa: E402
from models.llama import LAYER_FIELDS, LlamaModel, layer_part  # noqa: E402
from models.random_weights import TINY  # noqa: E402
from refengine.engine.instance import Instance  # noqa: E402
from refengine.engine.sequence import SamplingParams  # noqa: E402
from refengine.store.chunked_read import FileReader  # noqa: E402
from refengine.store.cuda_upload import pinned_empty  # noqa: E402
from refengine.store.model_store import ModelStore  # noqa: E402
from refengine.store.packed import read_index  # noqa: E402
from tests.store.tiny_packed import write_tiny_model  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def kernels() -> GpuKernels:
    return GpuKernels("cuda:0")


# the CUDA attention kernels take head dims 64 and 128 (TINY's is 16)
GPU_TINY = dataclasses.replace(TINY, head_dim=64)


@pytest.fixture
def files(tmp_path: Path):
    return write_tiny_model(tmp_path, "tiny", config=GPU_TINY)


def greedy(model: LlamaModel) -> list[int]:
    instance = Instance(model, num_blocks=8)
    seq = instance.add_request([5, 9, 2, 7, 11, 3], SamplingParams(max_tokens=10, ignore_eos=True))
    while instance.step() is not None:
        pass
    return seq.output_ids


def test_pinned_buffers_take_direct_reads() -> None:
    buffer = pinned_empty(1 << 20)
    assert buffer.ctypes.data % 4096 == 0 and buffer.nbytes == 1 << 20


def test_weights_on_the_gpu_equal_the_checkpoint(files, kernels, tmp_path: Path) -> None:
    store = ModelStore(tmp_path, host_budget=1 << 30, allocate=pinned_empty)
    index = read_index(files)
    host = np.fromfile(files.packed, dtype=np.uint8)
    expected = index.views(host)
    for source in ("disk", "host"):
        with store.load(files, kernels, "cuda:0") as lease:
            lease.load.wait()
            assert lease.load.source == source
            assert store.host.pins("tiny") == 0          # the GPU has its own copy
            w = lease.model.weights
            assert isinstance(w.embed, cupy.ndarray)
            assert np.array_equal(cupy.asnumpy(w.embed), expected["embed"])
            assert np.array_equal(cupy.asnumpy(w.lm_head), expected["lm_head"])
            for i, layer in enumerate(w.layers):
                for f in LAYER_FIELDS:
                    assert np.array_equal(cupy.asnumpy(getattr(layer, f)), expected[f"layers.{i}.{f}"])
            assert store.residency("tiny").devices == ("cuda:0",)
    store.close()


def test_execute_while_load_on_the_gpu(files, kernels, tmp_path: Path, monkeypatch) -> None:
    store = ModelStore(tmp_path, host_budget=0, allocate=pinned_empty)
    with store.load(files, kernels, "cuda:0") as lease:
        expected = greedy(lease.load.wait().model)
    real_read = FileReader.read_into

    def slow_read(self, buffer, offset):
        time.sleep(0.01)
        real_read(self, buffer, offset)

    monkeypatch.setattr(FileReader, "read_into", slow_read)
    with store.load(files, kernels, "cuda:0") as lease:
        assert not lease.load.arrival.complete
        assert greedy(lease.model) == expected
        ready = lease.load.arrival.ready_at
        assert ready[layer_part(0)] < ready[layer_part(GPU_TINY.num_hidden_layers - 1)]
    store.close()
