"""SLO verdicts of the metrics (SLINFER §6.1), without a server."""
from __future__ import annotations

import pytest

from refengine.runtime.api import Finished, SloOverride
from refengine.server.metrics import meets_slo


def finished(ttft_s: float, grace_s: float = 0.0, reason: str = "length") -> Finished:
    return Finished(reason, prompt_tokens=10, completion_tokens=5, ttft_s=ttft_s, cold_start=grace_s > 0,
                    cold_start_grace_s=grace_s)


@pytest.mark.parametrize("ttft_s,grace_s,met", [
    (0.4, 0.0, True),            # the paper's 0.5 s for a short prompt
    (0.9, 0.0, False),
    (0.9, 0.5, True),            # the cold start's wait extends the SLO (§4.5)
    (1.1, 0.5, False),
])
def test_ttft_is_judged_with_the_cold_start_grace(ttft_s, grace_s, met):
    assert meets_slo(finished(ttft_s, grace_s), tpot_s=0.1, slo=None) is met


def test_grace_extends_a_request_s_own_ttft_slo_and_never_saves_an_abort():
    assert meets_slo(finished(2.5, 1.0), tpot_s=0.1, slo=SloOverride(ttft_s=2.0))
    assert not meets_slo(finished(0.1, reason="abort"), tpot_s=0.1, slo=None)
    assert not meets_slo(finished(0.1, 1.0), tpot_s=0.3, slo=None)          # TPOT gets no grace
