"""Latency tables are cached per machine: one measured on another machine or another way, or unreadable, is
measured again; stalled points do not survive into a table. The warm-up serving runs at start-up."""
from __future__ import annotations

import json

import numpy as np

from kernels.cpu import CpuKernels
from kernels.cpu_decode_step import MAX_SEQUENCES
from kernels.model_wrapper import ModelWrapper
from refengine.runtime.profile import (QUICK_GRID, SOURCE, WARM_UP_BATCHES, WARM_UP_PREFILLS, cached_table,
                                      kernels_fingerprint, machine_of, stall_free, warm_up)
from scheduler.costmodel import profile_filename


def test_a_table_is_kept_for_its_machine_and_remeasured_elsewhere(tiny_model, tmp_path):
    loads = []

    def load():
        loads.append(1)
        return tiny_model

    first = cached_table(load, "tiny", "cpu-reference", tmp_path, "Machine A, 2 cores", QUICK_GRID, progress=False)
    path = tmp_path / profile_filename("tiny", "cpu-reference")
    assert json.loads(path.read_text())["machine"] == "Machine A, 2 cores"
    again = cached_table(load, "tiny", "cpu-reference", tmp_path, "Machine A, 2 cores", QUICK_GRID, progress=False)
    assert len(loads) == 1 and again.prefill_tokens == first.prefill_tokens     # a file read, no model
    cached_table(load, "tiny", "cpu-reference", tmp_path, "Machine B, 64 cores", QUICK_GRID, progress=False)
    assert len(loads) == 2 and json.loads(path.read_text())["machine"] == "Machine B, 64 cores"
    path.write_text("{not json")
    cached_table(load, "tiny", "cpu-reference", tmp_path, "Machine B, 64 cores", QUICK_GRID, progress=False)
    assert len(loads) == 3 and json.loads(path.read_text())["format"] == "refengine.latency/1"
    by_hand = {k: v for k, v in json.loads(path.read_text()).items() if k != "machine"}
    path.write_text(json.dumps(by_hand))                         # a pinned table applies anywhere
    cached_table(load, "tiny", "cpu-reference", tmp_path, "Machine C, 8 cores", QUICK_GRID, progress=False)
    assert len(loads) == 3


def test_machine_of_a_cpu_names_its_cores_and_kernels():
    machine = machine_of("cpu:0")
    assert " cores; kernels " in machine and "sgemm" in machine and machine_of("cpu:1") == machine


def test_a_kernel_change_changes_the_fingerprint(tmp_path, monkeypatch):
    """A table measured before the kernels changed is measured again (the file differs by one byte)."""
    import kernels
    fake = tmp_path / "kernels"
    (fake / "cuda").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "cpu.py").write_text("FAST = 1\n")
    monkeypatch.setattr(kernels, "__file__", str(fake / "__init__.py"))
    before = kernels_fingerprint("cuda")
    (fake / "cpu.py").write_text("FAST = 2\n")
    assert kernels_fingerprint("cuda") != before


def test_a_table_measured_the_old_way_is_measured_again(tiny_model, tmp_path):
    loads = []

    def load():
        loads.append(1)
        return tiny_model

    cached_table(load, "tiny", "cpu-reference", tmp_path, "Machine A, 2 cores", QUICK_GRID, progress=False)
    path = tmp_path / profile_filename("tiny", "cpu-reference")
    assert json.loads(path.read_text())["source"] == SOURCE
    path.write_text(json.dumps({**json.loads(path.read_text()), "source": "medians of 3 iterations per point"}))
    cached_table(load, "tiny", "cpu-reference", tmp_path, "Machine A, 2 cores", QUICK_GRID, progress=False)
    assert len(loads) == 2 and json.loads(path.read_text())["source"] == SOURCE


def test_stalled_points_are_capped_by_larger_workloads():
    """The decode table a VM with 30% stolen CPU time produced (contexts 128/512/1024 x batches
    1/4/16/32, ms): batch 1 at 128 tokens stalled to 260 ms; a larger point bounds each stall."""
    measured = [[260.4, 350.3, 191.7, 374.0],
                [51.1, 129.5, 169.6, 230.5],
                [50.7, 88.0, 266.9, 416.1]]
    np.testing.assert_allclose(stall_free(measured), [[50.7, 88.0, 169.6, 230.5],
                                                      [50.7, 88.0, 169.6, 230.5],
                                                      [50.7, 88.0, 266.9, 416.1]])
    np.testing.assert_allclose(stall_free([128.8, 97.5, 381.0, 2578.8]), [97.5, 97.5, 381.0, 2578.8])
    monotone = [[10.0, 20.0], [15.0, 30.0]]
    np.testing.assert_array_equal(stall_free(monotone), monotone)


def test_measured_tables_are_stall_free(tiny_model):
    from refengine.runtime.profile import measure_table
    table = measure_table(tiny_model, "tiny", "cpu-reference", QUICK_GRID, repeats=1, progress=False).to_dict()
    prefill = table["prefill"]["latency"]
    decode = [row["latency"] for row in table["decode"]]
    assert prefill == sorted(prefill)
    np.testing.assert_array_equal(stall_free(decode), decode)


def test_start_up_warns_when_one_decode_step_exceeds_the_tpot_slo(caplog):
    from refengine.runtime.setup import _warn_if_slower_than_the_slo
    from scheduler.costmodel import FORMAT, LatencyTable
    from scheduler.slo import SloPolicy

    def table(ms: float) -> LatencyTable:
        return LatencyTable.from_dict({"format": FORMAT, "profile": "tiny", "hardware": "cpu-cpu", "unit": "ms",
                                       "prefill": {"tokens": [16], "latency": [20.0]},
                                       "decode": [{"context": 128, "batch": [1, 4], "latency": [ms, ms * 2]}]})

    with caplog.at_level("WARNING", logger="refengine.runtime"):
        _warn_if_slower_than_the_slo(table(50.0), SloPolicy(margin=0.05))
        assert not caplog.records
        _warn_if_slower_than_the_slo(table(260.0), SloPolicy(margin=0.05))
    assert "260 ms (profiled), above the 238 ms TPOT SLO" in caplog.text and "tiny on cpu-cpu" in caplog.text


def test_a_stalled_point_is_capped_and_reported(tiny_model, monkeypatch, caplog):
    from refengine.runtime import profile
    prefill = {16: 0.030, 128: 0.020}                      # the 16-token point stalled
    monkeypatch.setattr(profile, "_prefill_latency", lambda model, tokens, repeats: prefill[tokens])
    monkeypatch.setattr(profile, "_decode_latency", lambda model, batch, context, repeats: 0.001 * batch * context)
    with caplog.at_level("INFO", logger="refengine.profile"):
        table = profile.measure_table(tiny_model, "tiny", "cpu-reference", QUICK_GRID, progress=False).to_dict()
    assert table["prefill"]["latency"] == [20.0, 20.0]
    assert [row["latency"] for row in table["decode"]] == [[64.0, 256.0], [256.0, 1024.0]]
    assert "1 of 6 points stalled" in caplog.text


class _StepRecorder(ModelWrapper):
    """Records (prefill?, tokens, sequences) of every step it runs."""

    def __init__(self, model):
        super().__init__(model)
        self.steps = []

    def forward(self, step, k_cache, v_cache, observe=None):
        self.steps.append((step.is_prefill, len(step.token_ids), len(step.context_lens)))
        return self.model.forward(step, k_cache, v_cache, observe)


def test_warm_up_runs_every_kind_of_step_serving_runs(tiny_model):
    """Prompts below and above the CPU's bf16 threshold, decode on the small-batch path and past it."""
    recorder = _StepRecorder(tiny_model)
    assert warm_up(recorder) > 0
    prefills = {tokens for prefill, tokens, _ in recorder.steps if prefill}
    batches = {sequences for prefill, _, sequences in recorder.steps if not prefill}
    assert prefills == set(WARM_UP_PREFILLS) and min(WARM_UP_PREFILLS) < CpuKernels().bf16_min_tokens <= max(WARM_UP_PREFILLS)
    assert batches == set(WARM_UP_BATCHES) and min(WARM_UP_BATCHES) <= MAX_SEQUENCES < max(WARM_UP_BATCHES)
