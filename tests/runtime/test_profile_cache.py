"""Latency tables are cached per machine: one measured on another machine, or unreadable, is measured again."""
from __future__ import annotations

import json

from refengine.runtime.profile import QUICK_GRID, cached_table, kernels_fingerprint, machine_of
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
