"""The figures of a `bench serve` point: the paper's SLO verdict, percentiles, goodput, failures, and
the server's peaks read from its Prometheus exposition."""
from __future__ import annotations

import pytest

from refengine.bench.serve_client import ServerSamples
from refengine.bench.serve_summary import ServerFigures, summarize, tpot
from refengine.sim.metrics import RequestRecord

FIGURES = ServerFigures(peak_rss_bytes=1 << 30, peak_device_memory_bytes=2e9, peak_instances=2, cold_starts=3,
                        preemptions=0)


def answered(arrival: float, ttft: float, tokens: int, tpot_s: float, prompt: int = 100) -> RequestRecord:
    first = arrival + ttft
    return RequestRecord("m", arrival, prompt, tokens, first_token=first, finish=first + (tokens - 1) * tpot_s)


def test_tpot_is_the_mean_gap_after_the_first_token():
    assert tpot(answered(0.0, 0.3, 11, 0.1)) == pytest.approx(0.1)
    assert tpot(answered(0.0, 0.3, 1, 0.1)) is None
    assert tpot(RequestRecord("m", 0.0, 10, 0, dropped="overloaded")) is None


def test_summary_judges_by_the_papers_slos_and_counts_failures_as_misses():
    records = [
        answered(0.0, 0.4, 11, 0.10),               # met
        answered(1.0, 0.6, 11, 0.10),               # TTFT over 0.5 s (100-token prompt)
        answered(2.0, 1.5, 5, 0.20, prompt=1024),   # met: a 1,024-token prompt has 2 s
        answered(3.0, 0.2, 3, 0.30),                # TPOT over 0.25 s
        RequestRecord("m", 4.0, 10, 0, dropped="overloaded"),
        RequestRecord("m", 5.0, 10, 0, dropped="timeout"),
        RequestRecord("m", 6.0, 10, 0, dropped="error: boom"),
        answered(7.0, 0.1, 4, 0.05),
    ]
    records[-1].dropped = "aborted"                 # cut short by the scheduler: a miss whatever its latency
    s = summarize(8, "slinfer", 1.0, 10.0, records, FIGURES)
    assert (s.requests, s.slo_met, s.slo_met_rate) == (8, 2, 0.25)
    assert s.failures == {"overloaded": 1, "aborted": 1, "timeout": 1, "error": 1}
    assert s.goodput_rps == pytest.approx(0.2) and s.goodput_tokens_per_s == pytest.approx(1.6)
    assert s.ttft_p50_s == pytest.approx(0.4)           # over the five answered: 0.1 0.2 0.4 0.6 1.5
    assert s.ttft_p99_s == pytest.approx(1.5)
    assert s.tpot_p50_s == pytest.approx(0.1) and s.tpot_p99_s == pytest.approx(0.3)


EXPOSITION = """\
# TYPE refengine_instances_loaded gauge
refengine_instances_loaded{{device="cpu:0"}} {loaded}
refengine_instances_loaded{{device="cpu:1"}} 1.0
# TYPE refengine_device_memory_actual_bytes gauge
refengine_device_memory_actual_bytes{{device="cpu:0"}} {memory}
refengine_device_memory_actual_bytes{{device="cpu:1"}} 1e9
# TYPE refengine_cold_starts counter
refengine_cold_starts_total {cold}
# TYPE refengine_preemptions counter
refengine_preemptions_total 0.0
# TYPE refengine_drops counter
refengine_drops_total 2.0
"""


def test_samples_keep_peaks_summed_over_devices_and_count_from_the_first_scrape():
    samples = ServerSamples()
    samples.add(EXPOSITION.format(loaded=0, memory=0, cold=1))        # after the warm-up
    samples.add(EXPOSITION.format(loaded=3, memory=3e9, cold=4))
    samples.add(EXPOSITION.format(loaded=0, memory=0, cold=6))
    assert samples.peak_instances_loaded == 4 and samples.peak_device_memory_bytes == 4e9
    assert samples.counted("cold_starts") == 5 and samples.counted("preemptions") == 0
