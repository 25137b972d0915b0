"""The figures of one `bench serve` point, from the client's per-request records (SLINFER §6.1).

- SLO met: TTFT ≤ min(max(0.5, L/512), 8) s + cold-start grace and mean TPOT ≤ 0.25 s (`SloPolicy`,
  no margin). The grace is what the server reports in the usage chunk (`cold_start_grace_s`, the
  time the request waited for its model to load, SLINFER §4.5), 0 for a warm model.
- Every failure is a miss: overloaded (429), aborted, timed out, or an error.
- TTFT and TPOT percentiles are over answered requests (a first token, resp. ≥ 2 tokens and a
  finish); failures are counted apart rather than written as infinite latencies.
- Goodput: SLO-met requests, and their output tokens, per second of offered trace.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from refengine.sim.metrics import RequestRecord, percentile

FAILURES = ("overloaded", "aborted", "timeout", "error")   # the client's `dropped` reasons, "error: ..." as one


def failure(record: RequestRecord) -> str | None:
    """Which of FAILURES befell the request, if any."""
    return None if record.dropped is None else record.dropped.split(":", 1)[0]


def tpot(record: RequestRecord) -> float | None:
    """Mean time per output token after the first, or None without one to measure."""
    if record.first_token is None or record.finish is None or record.output_tokens < 2:
        return None
    return (record.finish - record.first_token) / (record.output_tokens - 1)


@dataclass(frozen=True)
class ServerFigures:
    peak_rss_bytes: int | None        # the server process (VmHWM)
    peak_device_memory_bytes: float   # the runtime's actual allocations, /metrics, sampled
    peak_instances: float
    cold_starts: float
    preemptions: float


@dataclass(frozen=True)
class PointSummary:
    models: int
    scheduler: str
    load: float                      # offered, requests/s
    requests: int
    slo_met: int
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    goodput_rps: float
    goodput_tokens_per_s: float
    failures: dict[str, int]         # requests per kind of FAILURES
    server: ServerFigures

    @property
    def slo_met_rate(self) -> float:
        return self.slo_met / self.requests if self.requests else math.nan


def summarize(models: int, scheduler: str, load: float, duration_s: float, records: list[RequestRecord],
              server: ServerFigures) -> PointSummary:
    met = [r for r in records if r.slo_met()]
    ttfts = [r.first_token - r.arrival for r in records if r.first_token is not None]
    tpots = [t for t in map(tpot, records) if t is not None]
    failures = {kind: sum(failure(r) == kind for r in records) for kind in FAILURES}
    return PointSummary(
        models, scheduler, load, len(records), len(met),
        percentile(ttfts, 0.5), percentile(ttfts, 0.99), percentile(tpots, 0.5), percentile(tpots, 0.99),
        len(met) / duration_s, sum(r.output_tokens for r in met) / duration_s, failures, server)
