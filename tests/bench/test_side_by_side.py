"""The side-by-side benchmark's plumbing: synthetic steps on a real backend, rounds and medians,
the targets table's verdicts and the plot (the measurements themselves are `bench` commands)."""
from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np
import pytest

from refengine.bench import comparison_report, gguf_export, report, side_by_side, steps


def test_synthetic_decode_step_matches_what_the_engine_builds(tiny_model):
    step = steps.decode_step(tiny_model.config, batch=3, context=17, rng=np.random.default_rng(0))
    assert step.block_tables.shape == (3, 2)                       # 18 tokens -> 2 blocks of 16
    assert list(step.slot_mapping) == [1 * 16 + 1, 3 * 16 + 1, 5 * 16 + 1]
    assert list(step.context_lens) == [18, 18, 18]
    assert steps.decode_tokens_per_s(tiny_model, 3, 17, repeats=2) > 0
    assert steps.prefill_tokens_per_s(tiny_model, 40, repeats=1) > 0


def test_rounds_take_turns_and_quote_the_median(monkeypatch):
    calls = []
    figures = iter([10.0, 1.0, 30.0, 2.0, 20.0, 3.0])

    def fake(engine, cases, options):
        calls.append(engine)
        return {case: next(figures) for case in cases}

    monkeypatch.setattr(side_by_side, "_in_fresh_process", fake)
    rounds = side_by_side.run([("decode", 1, 128)], side_by_side.Options("cpu", True), rounds=3,
                              engines=["ours", "peer"], progress=lambda _: None)
    assert calls == ["ours", "peer"] * 3
    assert rounds == {"ours": {("decode", 1, 128): [10.0, 30.0, 20.0]}, "peer": {("decode", 1, 128): [1.0, 2.0, 3.0]}}
    assert side_by_side.medians(rounds) == {"ours": {("decode", 1, 128): 20.0}, "peer": {("decode", 1, 128): 2.0}}


def test_targets_say_met_or_missed_and_skip_what_did_not_run():
    results = {"refengine cuda graph": {("decode", 1, 128): 900.0, ("decode", 64, 128): 19_000.0},
               "transformers cuda eager": {("decode", 1, 128): 50.0, ("decode", 64, 128): 2_000.0}}
    bounds = {("decode", 1, 128): 7_500.0, ("decode", 64, 128): 290_000.0}
    table = comparison_report.targets_table(results, bounds, "cuda")
    assert "18.00×" in table and "| met |" in table                # 900 / 50 against ≥ 10×
    assert "12% of bound" in table and "**missed**" in table        # 900 / 7,500 against ≥ 20%
    cpu = comparison_report.targets_table(results, bounds, "cpu")
    assert cpu == ""                                                # no CPU engine ran


def test_targets_show_the_range_of_the_ratio_within_a_round():
    """The verdict is on the medians' ratio (20 / 2 = 10×); each round's own ratio (10, 15, 6.67)
    shows whether it held in every round."""
    rounds = {"refengine cuda graph": {("decode", 1, 128): [10.0, 30.0, 20.0]},
              "transformers cuda eager": {("decode", 1, 128): [1.0, 2.0, 3.0]}}
    bounds = {("decode", 1, 128): 100.0}
    table = comparison_report.targets_table(side_by_side.medians(rounds), bounds, "cuda", rounds)
    lines = table.splitlines()
    assert "ratio within a round (lowest – highest)" in lines[0]
    assert "| batch-1 decode vs transformers eager | 20.0 vs 2.0 | 10.00× | 6.67× – 15.00× | ≥ 10× | met |" in lines
    assert "| batch-1 decode vs bandwidth bound | 20.0 vs 100 | 20% of bound | 10% of bound – 30% of bound | ≥ 20% | met |" in lines


def test_plot_writes_a_png(tmp_path):
    results = {"a": {("decode", 1, 128): 40.0, ("decode", 8, 128): 180.0, ("prefill", 128): 700.0}}
    bounds = {("decode", 1, 128): 58.0, ("decode", 8, 128): 433.0}
    path = tmp_path / "plot.png"
    comparison_report.plot(results, bounds, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 1 × 128 | 40.0 | 58.0 |" in comparison_report.decode_table(results, bounds)
    assert "| 128 | 700 |" in comparison_report.prefill_table(results)


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_engines_put_ours_first(device):
    assert side_by_side.engines_for(device)[0].startswith("refengine")


def test_llama_cpp_engines_run_the_gguf_of_their_precision(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(side_by_side, "_weights", lambda options: (None, None, None))
    monkeypatch.setattr(gguf_export, "exported_gguf", lambda directory, precision: asked.append(precision) or tmp_path)
    monkeypatch.setattr(gguf_export, "source_gguf", lambda: tmp_path / "shipped.gguf")
    for engine in ("llama.cpp F32", "llama.cpp F16", "llama.cpp Q4_1"):
        side_by_side._runners(engine, side_by_side.Options("cpu", False))
    assert asked == ["f32", "f16"]                                  # the shipped file serves Q4_1


def test_our_cpu_engine_is_measured_as_served_on_a_quiet_machine(monkeypatch):
    """Small decode steps in one region, and no thread tuner: its first tries of one thread were two
    of a prefill case's three timed runs, and the median measured them (12-07)."""
    from kernels.cpu_decode_step import CpuDecodeModel
    from models.random_weights import TINY, random_tensors
    monkeypatch.setattr(side_by_side, "_weights", lambda options: (TINY, random_tensors(TINY, seed=1), None))
    measured = []
    monkeypatch.setattr(steps, "prefill_tokens_per_s", lambda model, n: measured.append(model) or 1.0)
    _, prefill = side_by_side._runners("refengine cpu fp32", side_by_side.Options("cpu", False))
    prefill(128)
    assert type(measured[0]) is CpuDecodeModel


def test_stolen_cpu_time_is_read_from_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 20 900 3 1 4 30 0 0\ncpu0 50 2 10 450 1 0 2 15 0 0\n")
    before = report.CpuTimes.read(stat)
    assert before == report.CpuTimes(busy=100 + 5 + 20 + 1 + 4, stolen=30)
    stat.write_text("cpu  200 5 40 900 3 1 4 70 0 0\n")
    assert report.stolen_percent(before, report.CpuTimes.read(stat)) == pytest.approx(100 * 40 / (40 + 120))
    assert report.stolen_percent(before, before) == 0.0


def test_stolen_cpu_time_is_unknown_without_a_steal_column(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 20 900\n")
    assert report.CpuTimes.read(stat) is None
    assert report.CpuTimes.read(tmp_path / "missing") is None
    assert report.stolen_percent(None, report.CpuTimes(1, 0)) is None


def test_stolen_note_warns_from_five_percent(monkeypatch):
    readings = iter([report.CpuTimes(busy=100, stolen=0), report.CpuTimes(busy=190, stolen=10)])
    monkeypatch.setattr(report.CpuTimes, "read", classmethod(lambda cls, stat=None: next(readings)))
    note = report.stolen_note(report.CpuTimes.read())
    assert note.startswith("CPU time stolen by the hypervisor during the run: 10% ") and "noisy" in note
    monkeypatch.setattr(report.CpuTimes, "read", classmethod(lambda cls, stat=None: None))
    assert report.stolen_note(None) == ""


def test_missing_or_shadowing_peer_packages_are_named_before_any_timing(monkeypatch):
    from refengine.bench import peers
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: None if name == "llama_cpp" else real_find_spec(name))
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: object())
    if real_find_spec("torch") and real_find_spec("transformers"):
        assert peers.unavailable("cuda").startswith("Hugging Face's `kernels` package")
    assert peers.unavailable("cpu").startswith("--peers needs ")
    assert "llama_cpp" in peers.unavailable("cpu")


def test_bench_peers_stops_in_one_line_when_peers_cannot_run(monkeypatch):
    from click.testing import CliRunner

    from cli import cli
    from refengine.bench import peers, side_by_side
    monkeypatch.setattr(peers, "unavailable", lambda kind: "--peers needs llama_cpp: pip install")
    monkeypatch.setattr(side_by_side, "run", lambda *a, **k: pytest.fail("timed anyway"))
    result = CliRunner().invoke(cli, ["bench", "prefill", "--peers", "--random-weights", "--no-write"])
    assert result.exit_code == 2 and "Error: --peers needs llama_cpp" in result.output


@pytest.mark.parametrize("flags, ran_amx, section", [
    ("fpu avx2 avx512f amx_bf16", True, "cpu-amx"),
    ("fpu avx2 avx512f avx512_bf16", False, "cpu"),
    ("fpu avx2 fma", False, "cpu-avx2"),
])
def test_side_by_side_sections_keep_each_instruction_set_on_record(monkeypatch, flags, ran_amx, section):
    from kernels import cpu_pool
    from refengine.bench import commands
    monkeypatch.setattr(cpu_pool, "cpu_info", lambda field: flags)
    assert commands._peers_section("cpu", ran_amx)[0] == section
    assert commands._peers_section("cuda", False) == ("cuda", "cuda")


@pytest.mark.parametrize("backend,batch,read", [("cpu", 1, 1000), ("cpu-bf16-weights", 1, 500),
                                               ("cpu-bf16-weights", 5, 500), ("cpu-bf16-weights", 6, 1000)])
def test_decode_bound_counts_the_weight_bytes_the_step_reads(backend, batch, read):
    """The bf16-weights engine reads its half-size copies at 1-5 sequences, float32 weights above
    (a bound from float32 bytes there read below what it measured)."""
    from types import SimpleNamespace

    from refengine.bench import commands
    model = SimpleNamespace(weights=SimpleNamespace(nbytes=lambda: 1000))
    assert commands._weight_bytes_read(backend, model, batch) == read
