"""`serve`'s flag parsing, and the options it hands the runtime (no server is started)."""
from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass

import pytest
import uvicorn
from click.testing import CliRunner

from models.catalogue import DEFAULT_MODEL, UnknownModelError
from refengine.server.commands import build_catalogue, device_memory, parse_devices, parse_size, serve

GIB = 2**30


@pytest.mark.parametrize("text,size", [("8GiB", 8 * GIB), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
                                       ("1000", 1000), (" 2 gib ", 2 * GIB), ("64KiB", 65536), ("3TB", 3 * 10**12)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text,devices", [
    ("cpu", ["cpu"]), ("cpu*2", ["cpu:0", "cpu:1"]), ("cpu:0,cpu:1", ["cpu:0", "cpu:1"]),
    ("cpu,cuda:0", ["cpu", "cuda:0"]), ("cuda", ["cuda:0"]), ("cuda*2, cpu", ["cuda:0", "cuda:1", "cpu"])])
def test_parse_devices(text, devices):
    assert parse_devices(text) == devices


@pytest.mark.parametrize("parse,text", [(parse_size, t) for t in ["8G", "lots", "", "-1GiB", "0", "1.5.2GiB", "GiB"]] +
                         [(parse_devices, t) for t in ["gpu", "cpu*0", "cpu:0*2", "cpu,cpu", "cpu*2,cpu:1", "", "cuda:x"]])
def test_parsers_refuse(parse, text):
    with pytest.raises(ValueError):
        parse(text)


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


def test_device_memory():
    assert device_memory(["cpu:0", "cpu:1", "cuda:0"], 8 * GIB, None) == {"cpu:0": 8 * GIB, "cpu:1": 8 * GIB}
    assert device_memory(["cpu", "cuda:0"], None, 40 * GIB) == {"cuda:0": 40 * GIB}


@dataclass
class RecordingRuntime:
    """Stands in for LiveRuntime: records its options; `serve` never starts it here."""

    options: object
    catalogue: object = None


@pytest.fixture
def recorded(monkeypatch):
    seen: dict = {}
    live = types.ModuleType("refengine.runtime.live")
    live.RuntimeOptions = lambda **kw: kw
    live.LiveRuntime = lambda options: seen.setdefault("runtime", RecordingRuntime(options, options["catalogue"]))
    monkeypatch.setitem(sys.modules, "refengine.runtime.live", live)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: seen.setdefault("config", self.config))
    return seen


def test_serve_wires_the_options(recorded):
    result = CliRunner().invoke(serve, ["--replicas", "3", "--devices", "cpu*2,cuda:0", "--cpu-memory", "8GiB",
                                        "--keep-alive", "2.5", "--scheduler", "exclusive", "--port", "8123"])
    assert result.exit_code == 0, result.output
    options = recorded["runtime"].options
    assert options["catalogue"].names[-1] == f"{DEFAULT_MODEL}-r3" and len(options["catalogue"].names) == 4
    assert options["devices"] == ["cpu:0", "cpu:1", "cuda:0"]
    assert options["memory"] == {"cpu:0": 8 * GIB, "cpu:1": 8 * GIB}
    assert options["keep_alive_s"] == 2.5 and options["scheduler"] == "exclusive"
    assert recorded["config"].port == 8123 and recorded["config"].host == "127.0.0.1"
    assert result.output.strip().splitlines() == [
        "refengine: 4 models on cpu:0,cpu:1,cuda:0 (exclusive, keep-alive 2.5 s) at http://127.0.0.1:8123/v1"]


@pytest.mark.parametrize("args,complaint", [(["--devices", "tpu"], "tpu"), (["--cpu-memory", "8G"], "8G"),
                                            (["--models", "nope"], "nope"), (["--keep-alive", "-1"], "keep-alive"),
                                            (["--scheduler", "fifo"], "fifo")])
def test_serve_refuses_bad_flags(recorded, args, complaint):
    result = CliRunner().invoke(serve, args)
    assert result.exit_code == 2 and complaint in result.output and "runtime" not in recorded
