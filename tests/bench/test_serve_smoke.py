"""`bench serve` end to end: a real `cli.py serve` process, a few trace requests replayed with the
OpenAI client, the figures summarised, tabulated and plotted. It checks the harness, not SLO
attainment: the model home holds tiny random weights under the default model's name (SmolLM2's
tokenizer, steps of milliseconds on the reference kernels), so the run takes seconds and no request
is late enough to be dropped."""
from __future__ import annotations

import pytest

from models.catalogue import DEFAULT_MODEL
from refengine.bench import serve_report
from refengine.bench.serve_bench import ServeBench, run
from refengine.runtime.profile import QUICK_GRID
from refengine.sim.workload import TRACES
from tests.server.conftest import write_tiny_model

pytestmark = pytest.mark.skipif(not (TRACES / "AzureLLMInferenceTrace_conv.csv").is_file(),
                                reason=f"Azure conversation trace absent from {TRACES} (set REFENGINE_TRACES)")


def test_replay_against_a_live_server_process(prepared_model, tmp_path):
    home = tmp_path / "home"
    write_tiny_model(home, prepared_model, name=DEFAULT_MODEL)
    bench = ServeBench(models=(2,), schedulers=("slinfer",), loads=(2.0,), duration_s=2.0, drain_s=20.0,
                       backend="reference", home=home, profile_grid=QUICK_GRID, length_scale=1 / 32)
    lines: list[str] = []
    [summary] = run(bench, lines.append)
    assert summary.requests == 4 and sum(summary.failures.values()) == 0
    assert summary.ttft_p50_s > 0 and summary.tpot_p50_s > 0
    assert summary.server.peak_rss_bytes > 50e6
    assert summary.server.peak_instances >= 1 and summary.server.cold_starts >= 1
    assert summary.server.peak_device_memory_bytes > 0
    assert (home / "profiles").is_dir() and lines[-1].startswith("    SLO met ")
    serve_report.plot([summary], tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert "### 2 models" in serve_report.tables([summary])
