"""`serve`'s flags and the options it hands the runtime (uvicorn is not started)."""
from __future__ import annotations

import asyncio
import json
import sys
import types

import pytest
import uvicorn
from click.testing import CliRunner

from models.catalogue import DEFAULT_MODEL, SamplingDefaults, UnknownModelError
from refengine.runtime.devices import DeviceSpec
from refengine.server.commands import build_catalogue, device_specs, serve

GIB = 2**30


def test_catalogue_choices(tmp_path):
    assert build_catalogue(None, 0).names == [DEFAULT_MODEL]
    assert build_catalogue(None, 2).names == [DEFAULT_MODEL, f"{DEFAULT_MODEL}-r1", f"{DEFAULT_MODEL}-r2"]
    assert build_catalogue(f"{DEFAULT_MODEL}-r2, {DEFAULT_MODEL}", 3).names == [f"{DEFAULT_MODEL}-r2", DEFAULT_MODEL]
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [{"name": "chat-a"}, {"name": "chat-b", "weights": DEFAULT_MODEL}]}))
    assert build_catalogue(str(path), 0).names == ["chat-a", "chat-b"]
    with pytest.raises(UnknownModelError):
        build_catalogue("nope", 0)
    with pytest.raises(ValueError):
        build_catalogue(str(path), 2)
    with pytest.raises(ValueError):
        build_catalogue(str(tmp_path / "missing.json"), 0)


def test_catalogue_sampling_defaults(tmp_path):
    """The default model samples as its model card does unless a catalogue entry says otherwise;
    an entry's bad value is a one-line error naming the file."""
    recommended = SamplingDefaults(temperature=0.2, top_p=0.9)
    assert all(build_catalogue(None, 2)[name].default_sampling == recommended
               for name in build_catalogue(None, 2).names)
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [{"name": "a"}, {"name": "b", "temperature": 0.7},
                                           {"name": "c", "weights": "other", "top_p": 0.5}]}))
    catalogue = build_catalogue(str(path), 0)
    assert catalogue["a"].default_sampling == recommended
    assert catalogue["b"].default_sampling == SamplingDefaults(temperature=0.7, top_p=0.9)
    assert catalogue["c"].default_sampling == SamplingDefaults(temperature=1.0, top_p=0.5)
    for bad in ({"temperature": "hot"}, {"temperature": 3}, {"top_p": 0}):
        path.write_text(json.dumps({"models": [{"name": "a", **bad}]}))
        with pytest.raises(ValueError, match=f"cannot read catalogue {path}: (temperature|top_p) must be"):
            build_catalogue(str(path), 0)


def test_device_specs():
    assert device_specs(["cpu:0", "cuda:0"], 8 * GIB, 40 * GIB) == [DeviceSpec("cpu:0", 8 * GIB),
                                                                    DeviceSpec("cuda:0", 40 * GIB)]


class StubRuntime:
    """Stands in for LiveRuntime: records its options and its start and stop."""

    failure: Exception | None = None

    def __init__(self, options):
        self.options, self.catalogue, self.calls = options, options.catalogue, []

    def prepare(self) -> None:
        self.calls.append("prepare")
        if self.failure is not None:
            raise self.failure

    async def start(self) -> None:
        self.calls.append("start")

    async def stop(self) -> None:
        self.calls.append("stop")


@pytest.fixture
def recorded(monkeypatch):
    """`serve` with a stub runtime, and uvicorn replaced by a run through the app's lifespan."""
    seen: dict = {}
    live = types.ModuleType("refengine.runtime.live")
    live.RuntimeOptions = types.SimpleNamespace
    live.LiveRuntime = lambda options: seen.setdefault("runtime", StubRuntime(options))

    def run(server: uvicorn.Server) -> None:
        seen["config"] = server.config
        server.started = True

        async def lifespan() -> None:
            async with server.config.app.router.lifespan_context(server.config.app):
                seen["runtime"].calls.append("serving")
        asyncio.run(lifespan())

    monkeypatch.setitem(sys.modules, "refengine.runtime.live", live)
    monkeypatch.setattr(uvicorn.Server, "run", run)
    return seen


def test_serve_wires_the_options(recorded, monkeypatch):
    checked = []
    monkeypatch.setattr("refengine.server.commands.check_device", lambda *device: checked.append(device))
    result = CliRunner().invoke(serve, ["--replicas", "3", "--devices", "cpu*2,cuda:0", "--cpu-memory", "4GiB",
                                        "--keep-alive", "2.5", "--scheduler", "exclusive", "--port", "8123",
                                        "--backend", "reference", "--host-cache", "512MiB"])
    assert result.exit_code == 0, result.output
    runtime = recorded["runtime"]
    assert runtime.catalogue.names[-1] == f"{DEFAULT_MODEL}-r3" and len(runtime.catalogue.names) == 4
    assert runtime.options.devices == [DeviceSpec("cpu:0", 4 * GIB), DeviceSpec("cpu:1", 4 * GIB),
                                       DeviceSpec("cuda:0", 16 * GIB)]
    assert runtime.options.keep_alive_s == 2.5 and runtime.options.scheduler == "exclusive"
    assert runtime.options.backend == "reference" and runtime.options.host_cache_bytes == 512 << 20
    assert runtime.calls == ["prepare", "start", "serving", "stop"]
    assert checked == [("cpu:0", "reference"), ("cpu:1", "reference"), ("cuda:0", "reference")]
    assert recorded["config"].port == 8123 and recorded["config"].host == "127.0.0.1"
    assert result.output.strip().splitlines() == [
        "refengine: 4 models on cpu:0,cpu:1,cuda:0 (exclusive, keep-alive 2.5 s) at http://127.0.0.1:8123/v1"]


@pytest.mark.parametrize("args,complaint", [(["--devices", "tpu"], "tpu"), (["--cpu-memory", "lots"], "lots"),
                                            (["--host-cache", "-1GiB"], "host-cache"),
                                            (["--models", "nope"], "nope"), (["--keep-alive", "-1"], "keep-alive"),
                                            (["--scheduler", "fifo"], "fifo"), (["--port", "70000"], "port")])
def test_serve_refuses_bad_flags(recorded, args, complaint):
    result = CliRunner().invoke(serve, args)
    assert result.exit_code == 2 and complaint in result.output and "runtime" not in recorded


def test_serve_refuses_a_gpu_this_machine_cannot_run_before_any_work(recorded, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)      # CuPy not installed
    result = CliRunner().invoke(serve, ["--devices", "cpu,cuda:0"])
    assert result.exit_code == 2 and "cuda:0 needs CuPy: pip install -e '.[cuda12]'" in result.output
    result = CliRunner().invoke(serve, ["--backend", "cuda"])
    assert result.exit_code == 2 and "the cuda backend runs on cuda or cuda:N, not 'cpu:0'" in result.output
    assert "runtime" not in recorded


def test_serve_refuses_a_catalogue_whose_weights_nothing_can_prepare(recorded, tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [{"name": "chat-a", "weights": "llama-70b"}]}))
    result = CliRunner().invoke(serve, ["--models", str(path)])
    assert result.exit_code == 2 and "unknown model 'llama-70b'" in result.output and "runtime" not in recorded


@pytest.mark.parametrize("error,message", [
    ("ModelCacheError", "tensors.bin is corrupt (bytes 0-16 fail their checksum); run `python cli.py prepare --force`"),
    ("ModelTooLarge", "smollm2-135m-instruct needs 873 MiB (weights, and KV for one request of its 8192-token "
                      "context), more than any device may use "
                      "(cpu:0 100 MiB); raise --cpu-memory or --gpu-memory")])
def test_serve_fails_in_one_line_when_the_runtime_cannot_start(recorded, monkeypatch, error, message):
    from refengine.runtime.setup import ModelTooLarge
    from refengine.store.cache import ModelCacheError
    failure = {"ModelCacheError": ModelCacheError, "ModelTooLarge": ModelTooLarge}[error](message)
    monkeypatch.setattr(StubRuntime, "failure", failure)
    result = CliRunner().invoke(serve, [])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {message}"
    assert recorded["runtime"].calls == ["prepare"] and "config" not in recorded     # uvicorn never started
