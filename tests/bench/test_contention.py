"""`bench contention`'s plumbing: the busy neighbours come and go, every policy runs every case,
and the report compares the tuner with the best fixed count (the figures are the command's)."""
from __future__ import annotations

import numba
import pytest

from kernels.cpu import CpuKernels
from kernels.cpu_decode_step import CpuDecodeModel
from models.llama import LlamaModel, LlamaWeights
from models.random_weights import TINY, random_tensors
from refengine.bench import contention


def test_busy_processes_spin_during_the_block_and_are_gone_after(monkeypatch):
    started = []
    real_popen = contention.subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(contention.subprocess, "Popen", recording_popen)
    with contention.busy_processes(2):
        assert len(started) == 2 and all(p.poll() is None for p in started)
    assert all(p.poll() is not None for p in started)
    with pytest.raises(RuntimeError):
        with contention.busy_processes(1):
            raise RuntimeError("a failing measurement")
    assert started[-1].poll() is not None


def test_every_policy_runs_every_case_and_the_report_compares_the_tuner():
    kernels = CpuKernels(bf16=False)
    model = CpuDecodeModel(LlamaModel(TINY, LlamaWeights.from_hf(random_tensors(TINY, seed=2), TINY, kernels), kernels))
    cases = (contention.Case("decode", 2, 20), contention.Case("prefill", 1, 24))
    lines = []
    results = contention.run(model, (0,), cases, num_steps=12, rounds=2, progress=lines.append)
    policies = contention.policies()
    assert policies[-1] == contention.TUNED and policies[0] == str(numba.get_num_threads())
    assert set(results) == {(0, case, p) for case in cases for p in policies}
    assert all(rate > 0 for rate in results.values())
    assert len(lines) == 2 * len(cases) * len(policies)
    text = contention.report(results, 12, 2)
    assert "| 0 | decode batch 2 × 20 |" in text and "| 0 | prefill 24 |" in text
    assert "tuned ÷ best fixed" in text
