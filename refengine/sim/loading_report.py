"""`simulate --compare-loading`: ServerlessLLM-style against λScale-style loading, as a document.

Writes one marked section of `docs/PAPER_REPRODUCTION.md` (kept when `--reproduce` rewrites the
rest): the multicast timing model on its own (`multicast.py`), then the same traces replayed with
the simulated tiers (`loading.py`) under each loading style, with the startup-time-aware placement
(issue 7 part 4) on and off, and preemption by live migration against drop-and-re-prefill (part
5's policy, `scheduler/migration.py`). Everything here is simulated.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm import tqdm

from refengine.bench.report import markdown_table, update_section
from refengine.sim.cluster import MODEL_SIZES
from refengine.sim.experiment import RunSpec, run_many
from refengine.sim.loading import GiB, Storage
from refengine.sim.multicast import multicast
from refengine.sim.workload import REPO_ROOT
from scheduler import LIVE_MIGRATION

DOC = REPO_ROOT / "docs" / "PAPER_REPRODUCTION.md"
CACHE_GIB = 64.0                        # per node: about five 7B models


def specs(trace: str | None) -> list[RunSpec]:
    """The SLINFER trace (64 × 7B, 4 CPU + 4 GPU) and a scale-out regime (8 hot models, 8 GPUs)."""
    paper = dict(size="7b", models=64, trace=trace)
    tiers = dict(paper, host_cache_gib=CACHE_GIB)
    burst = dict(size="7b", models=8, cpus=0, gpus=8, workload="pareto", rps=12.0,
                 duration=600.0, host_cache_gib=CACHE_GIB)
    return [
        RunSpec("slinfer", **paper),
        RunSpec("slinfer", **paper, loading="local"),
        RunSpec("slinfer", **tiers, loading="local"),
        RunSpec("slinfer", **tiers, loading="local", overrides=(("startup_tolerance", 0.11),)),
        RunSpec("slinfer", **tiers, loading="local", overrides=(("startup_aware", False),)),
        RunSpec("slinfer", **tiers, loading="multicast"),
        RunSpec("sllm", **tiers, loading="local"),
        RunSpec("sllm", **tiers, loading="multicast"),
        RunSpec("slinfer", **burst, loading="local"),
        RunSpec("slinfer", **burst, loading="multicast"),
        RunSpec("sllm", **burst, loading="local"),
        RunSpec("sllm", **burst, loading="multicast"),
        RunSpec("slinfer", "13b", 64, trace=trace),
        RunSpec("slinfer", "13b", 64, trace=trace, overrides=(("migration", True),)),
        RunSpec("slinfer", "13b", 64, trace=trace, overrides=SERVE_MIGRATION),
    ]


SERVE_MIGRATION = tuple(LIVE_MIGRATION.items())


def timing_table(size: str = "7b") -> str:
    """Seconds to scale one model out to N GPUs: local tiers against a k-source multicast."""
    st = Storage()
    nbytes = MODEL_SIZES[size][1] * GiB
    part = nbytes / (st.blocks * st.parts) / st.gpu_peer
    body = []
    for n in (1, 2, 4, 8):
        row = [str(n), f"{nbytes / st.disk_to_host:.2f}", f"{nbytes / st.gpu_host_to_device:.2f}"]
        for k in (1, 2, 4):
            mc = multicast(n, k, st.blocks, st.parts, part)
            row.append("–" if k > n else f"{mc.covered:.2f} / {max(mc.complete):.2f}")
        body.append(row)
    return markdown_table(["GPUs added", "each from SSD", "each from host", "multicast k=1",
                           "k=2", "k=4"], body)


def _run_label(r: dict) -> str:
    s = r["spec"]
    if s["loading"] is None:
        what = "fixed 1 s load (legacy)"
    else:
        cache = "every model" if s["host_cache_gib"] is None else f"{s['host_cache_gib']:g} GiB"
        what = f"{s['loading']}, host cache {cache}"
    extra = "".join(f", {k}={v}" for k, v in s["overrides"])
    return f"{s['system']}: {what}{extra}"


def _seconds(value: float | None) -> str:
    """Drops make a percentile infinite (written as null in JSON)."""
    return "inf" if value is None or math.isinf(value) else f"{value:.2f}"


def _loads(summary: dict, source: str) -> int:
    return summary["loads_by_source"].get(source, 0)


def _row(r: dict) -> list[str]:
    x = r["summary"]
    return [_run_label(r), f"{x['slo_met']} ({x['slo_met_rate']:.1%})", str(x["slo_met_no_grace"]),
            str(x["dropped"])] + [_seconds(x[k]) for k in ("ttft_p50_s", "ttft_p99_s",
                                                            "startup_mean_s", "startup_p99_s")] \
        + [" / ".join(str(_loads(x, k)) for k in ("disk", "host", "peer")),
           f"{x['gpu_nodes_used']:.2f}"]


HEADER = ["run", "SLO-met", "SLO-met without grace", "dropped", "TTFT p50 s", "TTFT p99 s",
          "start-up mean s", "start-up p99 s", "loads disk / host / peer", "GPUs used"]


def _yardstick(moved: int) -> str:
    """What the perturbed run says about the noise in a count of requests."""
    if moved == 0:
        return ("where the perturbation that changes nothing in principle changed no decision in "
                "this run, so it gives no yardstick")
    return f"where a perturbation that changes nothing in principle moves that count by {moved}"


def findings(results: list[dict]) -> list[str]:
    """The comparisons the grid was built for, as sentences with their numbers."""
    by = {_run_label(r) + ("" if r["spec"]["workload"] == "slinfer" else " (burst)"): r["summary"]
          for r in results if r["spec"]["size"] == "7b"}
    dropping, migrating, served = (r["summary"] for r in results if r["spec"]["size"] == "13b")
    cached = f"host cache {CACHE_GIB:g} GiB"
    aware, blind = by[f"slinfer: local, {cached}"], \
        by[f"slinfer: local, {cached}, startup_aware=False"]
    nudged = by[f"slinfer: local, {cached}, startup_tolerance=0.11"]
    multi = by[f"slinfer: multicast, {cached}"]
    burst_local, burst_multi = by[f"slinfer: local, {cached} (burst)"], \
        by[f"slinfer: multicast, {cached} (burst)"]
    return [
        f"- **Startup-time-aware placement** (trace, local loading): {_loads(aware, 'host')} "
        f"loads from a host cache against {_loads(blind, 'host')} without it, mean start-up "
        f"{aware['startup_mean_s']:.2f} s against {blind['startup_mean_s']:.2f} s, TTFT p99 "
        f"{_seconds(aware['ttft_p99_s'])} s "
        f"against {_seconds(blind['ttft_p99_s'])} s, {aware['slo_met_no_grace']} against "
        f"{blind['slo_met_no_grace']} requests within the SLO without grace.",
        f"- **Multicast on the trace**: {_loads(multi, 'peer')} of "
        f"{sum(multi['loads_by_source'].values())} loads found a GPU serving the model; mean "
        f"start-up {multi['startup_mean_s']:.2f} s against {aware['startup_mean_s']:.2f} s, "
        f"{multi['slo_met_no_grace']} against {aware['slo_met_no_grace']} within the SLO without "
        f"grace, {_yardstick(abs(nudged['slo_met_no_grace'] - aware['slo_met_no_grace']))}.",
        f"- **Multicast in the scale-out regime**: {_loads(burst_multi, 'peer')} loads from "
        f"peers; mean start-up {burst_multi['startup_mean_s']:.2f} s against "
        f"{burst_local['startup_mean_s']:.2f} s, {burst_multi['slo_met_no_grace']} against "
        f"{burst_local['slo_met_no_grace']} within the SLO without grace.",
        f"- **Live migration** (13B, where preemption is frequent): {migrating['migrations']} "
        f"requests moved live and {migrating['evictions']} dropped and re-prefilled, against "
        f"{dropping['evictions']} re-prefilled without it; {migrating['slo_met_no_grace']} against "
        f"{dropping['slo_met_no_grace']} within the SLO without grace. Under cumulative deadlines "
        "a decoding request has usually banked the slack to absorb a re-prefill, so migration "
        "is chosen for its shorter stall when a warm instance elsewhere can take the request and "
        "the preempting request can wait for the rebuild. Each hand-over costs the destination "
        "a catch-up prefill of the tokens made during the rebuild, which makes the next token "
        f"(median pause {_ms(migrating['handover_pause_p50_s'])} ms, at most "
        f"{_ms(migrating['handover_pause_max_s'])} ms; 0 where the rebuild reached the newest "
        f"token). As `serve` runs it (CPU victims and cold destinations too, up to 8 rebuild "
        f"rounds), {served['migrations']} requests move, {served['slo_met_no_grace']} within the "
        f"SLO without grace, with hand-over pauses of {_ms(served['handover_pause_p50_s'])} ms "
        f"median, {_ms(served['handover_pause_max_s'])} ms at most. With this few "
        "moves the rows differ by chaos more than by migration: one changed decision cascades "
        "through later placements, so differences this small between them say nothing about "
        "migration itself.",
    ]


def _ms(seconds: float | None) -> str:
    """Milliseconds; "–" where nothing was measured (NaN, written as null in JSON)."""
    return "–" if seconds is None or math.isnan(seconds) else f"{seconds * 1e3:.0f}"


def _migration_row(r: dict) -> list[str]:
    x = r["summary"]
    overrides = tuple(map(tuple, r["spec"]["overrides"]))
    how = {(): "drop and re-prefill", SERVE_MIGRATION: "live migration as `serve` runs it (CPU "
           "victims, cold destinations, 8 rounds)"}.get(overrides, "live migration")
    return [f"{r['spec']['system']}, {how}",
            f"{x['slo_met']} ({x['slo_met_rate']:.1%})", str(x["slo_met_no_grace"]),
            str(x["dropped"]), _seconds(x["ttft_p99_s"]), str(x["evictions"]),
            str(x["migrations"]),
            f"{_ms(x['handover_pause_p50_s'])} / {_ms(x['handover_pause_max_s'])}"]


def render(results: list[dict], wall: float) -> str:
    migration = [r for r in results if r["spec"]["size"] == "13b"]
    trace = [r for r in results if r["spec"]["workload"] == "slinfer" and r not in migration]
    burst = [r for r in results if r["spec"]["workload"] != "slinfer"]
    n = trace[0]["summary"]["requests"]
    return "\n".join([
        "All figures in this section are **simulated** (`python cli.py simulate "
        f"--compare-loading`, {len(results)} runs, {wall:.0f} s of wall time). Tiers, bandwidths "
        "and their sources: `refengine/sim/loading.py` (SSD → host 4.6 GB/s, host → GPU 12.6 "
        "GiB/s, GPU → GPU 30 GB/s, 8 blocks × 2 parts, 1 ms per pipeline hop); the scheduler is "
        "told the bandwidths and every host-cache change and places by estimated start-up "
        "(`scheduler/startup.py`) unless noted.",
        "",
        "### The multicast timing model: seconds to add N GPUs of Llama-2-7B (12.6 GiB)",
        "",
        "Local columns: every new GPU reads its own copy (ServerlessLLM). Multicast: "
        "*first pipeline / all whole* — when the new GPUs together hold every block (a cross-node "
        "pipeline can serve) and when each holds the whole model, from k GPUs already serving it "
        "(k-way split, binomial pipeline per group).",
        "",
        timing_table(),
        "",
        f"### SLINFER's trace: 64 × Llama-2-7B, 4 CPU + 4 GPU nodes, 30 min ({n} requests)",
        "",
        markdown_table(HEADER, [_row(r) for r in trace]),
        "",
        "### Scale-out regime: 8 hot models (Pareto popularity, 12 req/s), 8 GPUs, 10 min",
        "",
        markdown_table(HEADER, [_row(r) for r in burst]),
        "",
        "### Preemption: live migration against drop-and-re-prefill (64 × Llama-2-13B, legacy "
        "loads)",
        "",
        "A GPU preemption victim's decoding requests move live to warm instances of their model "
        "where that costs less (lateness first, then the stall of the running stream; "
        "`scheduler/migration.py`); the rest are evicted and re-prefilled as in SLINFER.",
        "",
        markdown_table(["preemption", "SLO-met", "SLO-met without grace", "dropped", "TTFT p99 s",
                        "evictions", "migrations", "hand-over pause p50 / max ms"],
                       [_migration_row(r) for r in migration]),
        "",
        "Findings:",
        "",
        *findings(results),
        "",
        "Reading the tables:",
        "",
        "- *Start-up* is from an instance's creation to its first step (load, KV allocation and "
        "any wait for memory or for the node). *SLO-met* forgives a cold start its grace "
        "(SLINFER §4.5: the estimated start-up, bounded by the actual wait); *without grace* "
        "does not, so faster loading shows there.",
        "- The run with `startup_tolerance=0.11` differs from the one above it by nothing in "
        "principle; the gap between them is the simulator's sensitivity to a perturbation, the "
        "yardstick for every other difference.",
        "- Multicast needs a GPU already serving the model: the *peer* count says how many loads "
        "found one. Every other load of a `multicast` run is local, gaining only "
        "execute-while-load, which saves at most one prefill per cold start.",
        "- Scheduler-driven scale-out adds one instance per decision, so the multi-receiver "
        "multicasts of the timing table (k-way split, cross-node pipelines) are rare in the "
        "replays; the simulator supports them when several loads of one model are issued at once.",
    ])


def compare_loading(out: Path, jobs: int = 2, trace: str | None = None,
                    doc: Path = DOC) -> str:
    """Run the comparison, write its section into `doc`; returns the section's text."""
    runs = specs(trace)
    start = time.perf_counter()
    with tqdm(total=len(runs), unit="run", desc="loading styles") as bar:
        results = run_many(runs, jobs, on_done=lambda _: bar.update())
    body = render(results, time.perf_counter() - start)
    update_section("loading", "Cold starts and migration: ServerlessLLM vs λScale (simulated)",
                   body, doc)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loading.json").write_text(json.dumps(results), encoding="utf-8")
    return body
