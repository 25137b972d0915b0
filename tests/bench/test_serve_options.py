"""`bench serve`'s options reach the server processes it starts."""
from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from refengine.bench.commands import bench
from refengine.bench.serve_bench import ServeBench


def test_serve_args_carry_the_host_cache():
    args = ServeBench(host_cache="0").serve_args(8, "exclusive")
    assert args[args.index("--host-cache") + 1] == "0"
    assert args[args.index("--replicas") + 1] == "7" and args[args.index("--scheduler") + 1] == "exclusive"


def test_a_bad_host_cache_is_refused_before_any_server_starts():
    result = CliRunner().invoke(bench, ["serve", "--host-cache", "lots", "--no-write"])
    assert result.exit_code == 2 and "--host-cache" in result.output and "lots" in result.output


@pytest.mark.parametrize("devices, complaint", [("tpu", "unknown device 'tpu:0'"), ("cpu,cuda:0", "cuda:0 needs CuPy")])
def test_a_device_this_machine_cannot_run_is_refused_before_any_server_starts(devices, complaint, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    result = CliRunner().invoke(bench, ["serve", "--devices", devices, "--no-write"])
    assert result.exit_code == 2 and complaint in result.output and "points of" not in result.output
