"""Metrics as the SLINFER evaluation defines them (§6.1).

- SLO-met requests: TTFT ≤ TTFT_SLO(L) + cold-start grace and mean TPOT ≤ 0.25 s; drops fail.
  Also counted without the grace, so that faster cold starts show (issue 7: loading styles).
  Requests whose clients left early (`--leave-rate`) are neither met nor failed: the rate is of
  the others.
- Start-up: seconds from an instance's creation to its first step (load, KV, waiting for the node).
- TTFT CDF with drops at +inf (the curve stops below 1).
- Average nodes used per device kind: mean over 1 s samples of nodes holding ≥ 1 instance.
- Decode speed: decode tokens per node-second of node usage, per device kind.
- Memory utilisation of GPU instances (used / allocated, KV and weights+KV), batch-size CDF,
  share of GPU instance lifetime spent resizing KV, scheduler time per decision (a real clock,
  measured here around `handle`, never inside the scheduler).
"""
from __future__ import annotations

import math
from array import array
from collections import Counter
from dataclasses import dataclass, field

from scheduler import SloPolicy

PAPER_SLO = SloPolicy()


@dataclass
class RequestRecord:
    model: str
    arrival: float
    input_tokens: int
    output_tokens: int
    first_token: float | None = None
    finish: float | None = None
    grace: float = 0.0
    dropped: str | None = None
    cancelled: bool = False     # its client left before the end (`Simulation(cancellations=...)`)
    evictions: int = 0

    @property
    def ttft(self) -> float:
        if self.first_token is None or self.dropped:
            return math.inf
        return self.first_token - self.arrival

    def slo_met(self, slo: SloPolicy = PAPER_SLO, with_grace: bool = True) -> bool:
        if self.dropped or self.first_token is None or self.finish is None:
            return False
        return slo.met(self.arrival, self.grace if with_grace else 0.0, self.input_tokens,
                       self.first_token, self.finish, self.output_tokens)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; inf entries sort last."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Recorder:
    """Everything the simulator observes; `summary()` turns it into the paper's figures."""

    requests: dict[str, RequestRecord] = field(default_factory=dict)
    nodes_used: dict[str, list[int]] = field(default_factory=lambda: {"cpu": [], "gpu": []})
    kv_util: list[float] = field(default_factory=list)
    mem_util: list[float] = field(default_factory=list)
    batch_hist: dict[str, Counter] = field(
        default_factory=lambda: {"cpu": Counter(), "gpu": Counter()})
    decode_tokens: Counter = field(default_factory=Counter)
    resize_seconds: float = 0.0
    gpu_instance_seconds: float = 0.0
    kv_overflows: int = 0
    startups: list[float] = field(default_factory=list)
    load_sources: Counter = field(default_factory=Counter)
    migrations: int = 0
    handover_pauses: list[float] = field(default_factory=list)   # wait for the node + catch-up, s
    sched_seconds: dict[str, array] = field(default_factory=dict)

    def sched_time(self, event_type: str, seconds: float) -> None:
        self.sched_seconds.setdefault(event_type, array("d")).append(seconds)

    def summary(self) -> dict:
        recs = list(self.requests.values())
        met = sum(r.slo_met() for r in recs)
        stayed = len(recs) - sum(r.cancelled for r in recs)     # the rate is of those
        ttfts = [r.ttft for r in recs]
        out: dict = {
            "requests": len(recs),
            "slo_met": met,
            "slo_met_rate": met / stayed if stayed else math.nan,
            "slo_met_no_grace": sum(r.slo_met(with_grace=False) for r in recs),
            "dropped": sum(r.dropped is not None for r in recs),
            "cancelled": sum(r.cancelled for r in recs),
            "evictions": sum(r.evictions for r in recs),
            "migrations": self.migrations,
            "handover_pause_p50_s": percentile(self.handover_pauses, 0.5),
            "handover_pause_max_s": max(self.handover_pauses, default=math.nan),
            "ttft_p50_s": percentile(ttfts, 0.5),
            "ttft_p90_s": percentile(ttfts, 0.9),
            "ttft_p99_s": percentile(ttfts, 0.99),
            "kv_overflows": self.kv_overflows,
            "startups": len(self.startups),
            "startup_mean_s": (sum(self.startups) / len(self.startups) if self.startups
                               else math.nan),
            "startup_p99_s": percentile(self.startups, 0.99),
            "loads_by_source": dict(sorted(self.load_sources.items())),
            "kv_resize_share": (self.resize_seconds / self.gpu_instance_seconds
                                if self.gpu_instance_seconds else 0.0),
            "gpu_kv_util": sum(self.kv_util) / len(self.kv_util) if self.kv_util else math.nan,
            "gpu_mem_util": sum(self.mem_util) / len(self.mem_util) if self.mem_util else math.nan,
        }
        for kind in ("cpu", "gpu"):
            samples = self.nodes_used[kind]
            out[f"{kind}_nodes_used"] = sum(samples) / len(samples) if samples else 0.0
            node_seconds = float(sum(samples))
            out[f"{kind}_decode_tok_per_node_s"] = (self.decode_tokens[kind] / node_seconds
                                                    if node_seconds else 0.0)
            hist = self.batch_hist[kind]
            iters = sum(hist.values())
            out[f"{kind}_mean_batch"] = (sum(b * n for b, n in hist.items()) / iters
                                         if iters else 0.0)
        all_times = [t for times in self.sched_seconds.values() for t in times]
        out["sched_decisions"] = len(all_times)
        out["sched_p50_us"] = percentile(all_times, 0.5) * 1e6
        out["sched_p99_us"] = percentile(all_times, 0.99) * 1e6
        out["sched_by_event_us"] = {
            k: {"n": len(v), "p50": percentile(list(v), 0.5) * 1e6,
                "p99": percentile(list(v), 0.99) * 1e6}
            for k, v in sorted(self.sched_seconds.items())}
        return out

    def ttft_cdf(self) -> list[float]:
        """Sorted TTFTs, drops as +inf (for plotting)."""
        return sorted(r.ttft for r in self.requests.values())

    def batch_cdf(self, kind: str) -> list[tuple[int, float]]:
        hist = self.batch_hist[kind]
        total, acc, out = sum(hist.values()), 0, []
        for b in sorted(hist):
            acc += hist[b]
            out.append((b, acc / total))
        return out
