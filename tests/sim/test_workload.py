import pytest

from refengine.sim.workload import azure_llm, pareto, slinfer_trace
from sim_checks import needs_traces

pytestmark = needs_traces


@pytest.mark.parametrize("n, total", [(32, 2366), (64, 4684), (128, 9266)])
def test_paper_loads_are_exact_subsets(n, total):
    w = slinfer_trace(n)
    assert len(w.models) == n and len(w.requests) == total       # Fig. 21
    assert w.duration == 1800.0
    assert all(a.arrival <= b.arrival for a, b in zip(w.requests, w.requests[1:]))


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of 16"):
        slinfer_trace(30)
    with pytest.raises(FileNotFoundError, match="--trace"):
        slinfer_trace(32, tmp_path / "missing.json")


def test_generators_are_seeded_and_skewed():
    a, b = pareto(2.0, seed=3), pareto(2.0, seed=3)
    assert a == b
    top = max(sum(r.model == m for r in a.requests) for m in a.models) / len(a.requests)
    assert 0.45 < top < 0.65                                       # BurstGPT-like: top ≈ half
    assert len(pareto(4.0).requests) == pytest.approx(2400, rel=0.1)
    az = azure_llm(16, duration=300, seed=1)
    assert az == azure_llm(16, duration=300, seed=1)
    assert all(r.input_tokens + r.output_tokens <= 4096 for r in az.requests)
