"""Which backend a device gets, and the one-line errors for a backend this machine cannot run."""
from __future__ import annotations

import sys
import types

import pytest

from kernels import BackendUnavailable, backend_for_device, check_device, cuda_sources, get_kernels


def test_each_device_gets_its_own_backend_unless_one_is_named():
    assert backend_for_device("cpu") == backend_for_device("cpu:1") == "cpu"
    assert backend_for_device("cuda:0") == "cuda"
    assert backend_for_device("cuda:0", "reference") == "reference"
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        backend_for_device("tpu")
    with pytest.raises(ValueError, match="unknown kernel backend 'fast'"):
        get_kernels("fast")


def test_cpu_backends_need_nothing_more():
    check_device("cpu")
    check_device("cpu:1", "reference")
    check_device("cpu:1", "cpu-bf16-weights")


def test_the_bf16_weights_backend_is_the_cpu_one_reading_bf16_weights_and_only_on_a_cpu():
    assert get_kernels("cpu-bf16-weights").bf16_weights and not get_kernels("cpu").bf16_weights
    with pytest.raises(BackendUnavailable, match="cpu-bf16-weights backend runs on cpu or cpu:N, not 'cuda:0'"):
        check_device("cuda:0", "cpu-bf16-weights")


def test_the_cuda_backend_needs_a_cuda_device():
    with pytest.raises(BackendUnavailable, match="runs on cuda or cuda:N, not 'cpu'"):
        check_device("cpu", "cuda")
    with pytest.raises(BackendUnavailable, match="bad device 'cuda:x'"):
        check_device("cuda:x")


def test_a_cuda_device_without_cupy_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)      # what `import cupy` meets where it is not installed
    for device, backend in (("cuda", None), ("cuda:0", "reference")):   # pinned buffers need CuPy too
        with pytest.raises(BackendUnavailable, match=r"needs CuPy: pip install -e '\.\[cuda12\]'"):
            check_device(device, backend)
    with pytest.raises(BackendUnavailable, match="needs CuPy"):
        get_kernels("cuda", "cuda:0")


def _fake_cupy(count: int | None) -> types.ModuleType:
    """A stand-in CuPy whose runtime reports `count` GPUs (None: the driver call fails)."""
    class CUDARuntimeError(RuntimeError):
        pass

    def device_count() -> int:
        if count is None:
            raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
        return count
    runtime = types.SimpleNamespace(getDeviceCount=device_count, CUDARuntimeError=CUDARuntimeError)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))


def test_a_missing_gpu_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(None))
    with pytest.raises(BackendUnavailable, match="CuPy finds no usable CUDA GPU here .*cudaErrorNoDevice"):
        check_device("cuda:0")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(1))
    check_device("cuda:0")
    with pytest.raises(BackendUnavailable, match="cuda:1: this machine has 1 CUDA GPU"):
        check_device("cuda:1")


def test_the_cuda_attention_kernels_refuse_a_head_dim_they_have_no_template_for():
    with pytest.raises(ValueError, match="head dim 64 or 128, not 96"):
        cuda_sources.attention(96, 3)
