import pytest

from scheduler.slo import SloPolicy
from scheduler.state import Request


def test_ttft_slo_formula():
    slo = SloPolicy()
    assert slo.ttft(100) == 0.5
    assert slo.ttft(1024) == 2.0
    assert slo.ttft(8192) == 8.0
    assert slo.ttft(100_000) == 8.0
    assert SloPolicy(margin=0.05).ttft(1024) == pytest.approx(1.9)   # the artifact's 5 %
    assert SloPolicy(margin=0.05).tpot_slo == pytest.approx(0.2375)


def test_cumulative_deadline_banks_slack():
    slo = SloPolicy()
    req = Request("r", "m", 1024, 10, arrival=10.0, ttft_slo=slo.ttft(1024), tpot_slo=slo.tpot_slo,
                  grace=1.0)
    # token k+1 is due at ST + grace + TTFT + k·TPOT
    assert req.deadline == 13.0
    req.generated = 4
    assert req.deadline == 14.0


def test_met_judges_ttft_with_grace_and_mean_tpot():
    slo = SloPolicy()
    assert slo.met(0.0, 0.0, 1024, first_token=2.0, finish=2.0 + 0.25 * 9, output_tokens=10)
    assert not slo.met(0.0, 0.0, 1024, first_token=2.1, finish=3.0, output_tokens=10)
    assert slo.met(0.0, 1.0, 1024, first_token=2.9, finish=3.0, output_tokens=1)
    assert not slo.met(0.0, 0.0, 100, first_token=0.1, finish=0.1 + 0.26 * 9, output_tokens=10)
