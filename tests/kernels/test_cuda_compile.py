"""Every CUDA kernel of the CuPy backend compiles, on a machine without a GPU.

NVRTC (NVIDIA's runtime compiler, the one CuPy calls) needs no driver or GPU, so the default suite
builds each source of `kernels.cuda_sources` with the backend's own options and template instances
into machine code for the GPUs this project runs on, and checks what only a GPU run would otherwise
show: the source compiles without warnings, every template instance and every elementwise kernel
`kernels.gpu` launches exists, and no kernel spills registers to local memory (ptxas's report),
with one known exception bounded below. Numerical parity on a GPU stays in test_gpu_kernels.py.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from kernels import cuda_sources
from kernels.cuda_sources import CudaSource

nvrtc = pytest.importorskip(
    "cuda.bindings.nvrtc", reason="NVRTC bindings (cuda-bindings, from the test extra) are not installed")

ARCHITECTURES = ("sm_80", "sm_90")   # A100; H100 and H200, the GPUs this project is lent
GROUPS = (1, 3, 4)                   # query heads per KV head: MHA, SmolLM2's 3, Llama's 4
GPU_BACKEND = Path(cuda_sources.__file__).with_name("gpu.py")
# prefill_attention, as found by this test (NVRTC 13.5): ptxas keeps it near 96 registers and spills
# 4-16 bytes in 6 of the 12 (arch, D, G) builds. `__launch_bounds__(128, 1)` removes every spill but
# takes 127-155 registers, cutting blocks per SM from about 5 to 3; which is faster needs a GPU to
# tell, so the kernel stays as it is and this bound only catches a spill growing.
PREFILL_SPILL_BYTES = 16


def _launched_elementwise_kernels() -> tuple[str, ...]:
    """Names `kernels.gpu` looks up in the elementwise module (extern "C", so no name expression)."""
    names = re.findall(r'self\._kernel\(self\._elementwise, "(\w+)"\)', GPU_BACKEND.read_text())
    assert names, "kernels/gpu.py no longer looks up elementwise kernels this way: update the test"
    return tuple(sorted(set(names)))


def _check(result: tuple) -> tuple:
    assert result[0] == nvrtc.nvrtcResult.NVRTC_SUCCESS, result[0]
    return result[1:]


def _log(program) -> str:
    (size,) = _check(nvrtc.nvrtcGetProgramLogSize(program))
    log = b" " * size
    _check(nvrtc.nvrtcGetProgramLog(program, log))
    return log.decode(errors="replace").rstrip("\x00 ")


def compile_source(source: CudaSource, architecture: str, names: tuple[str, ...] = ()) -> str:
    """Compile as `kernels.gpu._compile` does, to machine code for `architecture`; every name
    expression must resolve. Returns NVRTC's log, ptxas's resource report included."""
    try:
        (program,) = _check(nvrtc.nvrtcCreateProgram(source.code().encode(), source.file.encode(), 0, [], []))
    except RuntimeError as e:       # the bindings import, but libnvrtc itself is missing
        pytest.skip(f"NVRTC cannot be loaded: {e}")
    try:
        expressions = source.templates + names
        for name in expressions:
            _check(nvrtc.nvrtcAddNameExpression(program, name.encode()))
        options = [o.encode() for o in (*cuda_sources.NVRTC_OPTIONS, f"--gpu-architecture={architecture}",
                                        "--ptxas-options=-v")]
        (result,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
        log = _log(program)
        assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS, f"{source.file} for {architecture}:\n{log}"
        for name in expressions:
            _check(nvrtc.nvrtcGetLoweredName(program, name.encode()))
        return log
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def _spills(log: str) -> dict[str, int]:
    """Bytes of register spill stores per kernel, from ptxas's -v report."""
    report = re.findall(r"Function properties for (\w+)\n.*? (\d+) bytes spill stores", log)
    assert report, f"ptxas reported no resource usage:\n{log}"
    return {kernel: int(stored) for kernel, stored in report}


def _assert_clean(log: str, allowed: dict[str, int] | None = None) -> None:
    """No warning; no kernel spills more than `allowed` says (kernel name prefix -> bytes; 0 else)."""
    assert "warning" not in log.lower(), log
    for kernel, stored in _spills(log).items():
        limit = next((b for prefix, b in (allowed or {}).items() if prefix in kernel), 0)
        assert stored <= limit, f"{kernel} spills {stored} bytes of registers (at most {limit}):\n{log}"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_elementwise_kernels_compile_with_every_name_the_backend_launches(architecture):
    log = compile_source(cuda_sources.ELEMENTWISE, architecture, _launched_elementwise_kernels())
    _assert_clean(log)
    for name in _launched_elementwise_kernels():
        assert f"entry function '{name}'" in log


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_gemv_tile_compiles(architecture):
    log = compile_source(cuda_sources.GEMV, architecture)
    _assert_clean(log)
    assert log.count("Compiling entry function") == len(cuda_sources.GEMV_SHAPES)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("head_dim", cuda_sources.ATTENTION_HEAD_DIMS)
@pytest.mark.parametrize("group", GROUPS)
def test_attention_compiles_for_each_head_dim_and_group(architecture, head_dim, group):
    log = compile_source(cuda_sources.attention(head_dim, group), architecture)
    _assert_clean(log, {"prefill_attention": PREFILL_SPILL_BYTES})
    assert log.count("Compiling entry function") == 2   # decode and prefill


def test_a_broken_name_fails_to_compile_with_nvrtcs_message():
    """The check itself: a name the source lacks is a compile error, not a silent pass."""
    with pytest.raises(AssertionError, match="nonexistent"):
        compile_source(cuda_sources.ELEMENTWISE, "sm_90", ("nonexistent",))

