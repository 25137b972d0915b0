"""`bench serve` figures as Markdown tables (one per number of models) and a PNG: SLO-met rate against
offered load, one panel per number of models, one line per scheduler (matplotlib, Agg backend)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, median

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from refengine.bench.report import markdown_table  # noqa: E402
from refengine.bench.serve_bench import ServeBench  # noqa: E402
from refengine.bench.serve_summary import FAILURES, PointSummary  # noqa: E402
from refengine.bench.serve_workload import CONTEXT, serve_workload, served_names  # noqa: E402


@dataclass(frozen=True)
class RunNotes:
    """What the doc says about the run beside its figures."""

    command: str
    wall_s: float
    loadavg_start: tuple[float, float, float]
    loadavg_end: tuple[float, float, float]
    plot_name: str              # the PNG, relative to docs/


LINE_STYLES = (("o", "-", "full"), ("s", "--", "none"), ("^", ":", "none"))   # marker, dash, fill
HEADER = ["scheduler", "offered req/s", "requests", "SLO met", "TTFT p50 / p99 s", "TPOT p50 / p99 s",
          "goodput req/s", "goodput tok/s", " / ".join(FAILURES), "cold starts / preemptions",
          "peak instances", "peak RSS GiB", "peak device memory GiB"]


def _gib(value: float | None) -> str:
    return "–" if value is None else f"{value / (1 << 30):.2f}"


def _row(s: PointSummary) -> list[object]:
    return [s.scheduler, f"{s.load:g}", s.requests, f"{s.slo_met} ({s.slo_met_rate:.0%})",
            f"{s.ttft_p50_s:.2f} / {s.ttft_p99_s:.2f}", f"{s.tpot_p50_s:.3f} / {s.tpot_p99_s:.3f}",
            f"{s.goodput_rps:.2f}", f"{s.goodput_tokens_per_s:.1f}",
            " / ".join(str(s.failures[k]) for k in FAILURES),
            f"{s.server.cold_starts:.0f} / {s.server.preemptions:.0f}",
            f"{s.server.peak_instances:.0f}", _gib(s.server.peak_rss_bytes), _gib(s.server.peak_device_memory_bytes)]


def tables(summaries: list[PointSummary]) -> str:
    """One table per number of models, rows by scheduler then load."""
    parts = []
    for models in sorted({s.models for s in summaries}):
        rows = [_row(s) for s in summaries if s.models == models]
        parts.append(f"### {models} models\n\n{markdown_table(HEADER, rows)}")
    return "\n\n".join(parts)


def plot(summaries: list[PointSummary], path: Path) -> None:
    """SLO-met rate against offered load (doubling steps, so a log-2 axis): a panel per number of models,
    a line per scheduler, each with its own marker, dash and fill so that equal figures stay visible."""
    counts = sorted({s.models for s in summaries})
    loads = sorted({s.load for s in summaries})
    fig, axes = plt.subplots(1, len(counts), figsize=(4.5 * len(counts), 3.6), sharey=True, squeeze=False)
    for ax, models in zip(axes[0], counts):
        schedulers = dict.fromkeys(s.scheduler for s in summaries)
        for scheduler, (marker, dash, fill) in zip(schedulers, itertools.cycle(LINE_STYLES)):
            points = sorted((s.load, s.slo_met_rate) for s in summaries
                            if s.models == models and s.scheduler == scheduler)
            ax.plot(*zip(*points), marker=marker, linestyle=dash, fillstyle=fill, markersize=8, label=scheduler)
        ax.set_xscale("log", base=2)
        ax.set_xticks(loads, [f"{load:g}" for load in loads])
        ax.set_title(f"{models} models")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("SLO-met rate")
    axes[0][0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section(bench: ServeBench, summaries: list[PointSummary], notes: RunNotes) -> str:
    """The Markdown of docs/BENCHMARKS.md's serve section: how it was measured, tables, the plot."""
    biggest = serve_workload(served_names(max(bench.models)), max(bench.loads), bench.duration_s, bench.seed,
                             bench.length_scale).requests
    prompts, outputs = [r.input_tokens for r in biggest], [r.output_tokens for r in biggest]
    kernels = f"`{bench.backend}` kernels" if bench.backend else "each device's own kernels"
    return f"""Command: `{notes.command}`: {len(summaries)} points in {notes.wall_s / 60:.1f} min on devices
`{bench.devices}` with {kernels}. Load average (1/5/15 min) {_load(notes.loadavg_start)} at the start,
{_load(notes.loadavg_end)} at the end: the machine was shared with other sessions' jobs, so read
latencies as upper bounds.

- **Workload**: the first ⌈load × {bench.duration_s:g} s⌉ requests of `AzureLLMInferenceTrace_conv.csv`,
  arrivals rescaled to the offered load (the trace's burstiness kept), prompt and output lengths
  × {bench.length_scale:g} (at least 1, clipped to {CONTEXT} tokens): prompt mean {mean(prompts):.0f} /
  median {median(prompts):.0f}, output mean {mean(outputs):.0f} / median {median(outputs):.0f} tokens in the largest slice.
  Requests go to the N served models (`serve --replicas N-1`: N names on one set of weights) by
  Zipf(1) popularity, seed {bench.seed}. Prompts are token ids; `ignore_eos` makes every output the
  trace's length.
- **Each point**: a fresh `cli.py serve` process (keep-alive {bench.keep_alive_s:g} s, memory budget
  {bench.cpu_memory} per CPU device and {bench.gpu_memory} per GPU, host cache {bench.host_cache}), one warm-up request, idle until
  scaled back to zero, then an open-loop replay with the OpenAI client (streaming, so TTFT and TPOT
  are taken by the client); requests unfinished {bench.drain_s:g} s after the last arrival time out.
- **SLO met** (SLINFER §6.1): TTFT ≤ min(max(0.5, L/512), 8) s + the cold-start grace the server
  reports in its usage chunk (`cold_start_grace_s`, the wait for the model's load, §4.5), and mean
  TPOT ≤ 0.25 s. Overloaded (429), aborted,
  timed-out and failed requests are misses. TTFT/TPOT percentiles are over answered requests;
  goodput is SLO-met requests (tokens) per second of offered trace. Peak RSS is the server
  process's `VmHWM` (pages touched); peak device memory is what the runtime allocated (weights and
  KV cache, `/metrics`, sampled every 0.5 s; the exclusive baseline gives its one instance the
  whole budget as KV cache, mostly untouched). Cold starts and preemptions exclude the warm-up.
  p99 of a few dozen requests is close to their maximum.

{tables(summaries)}

![SLO-met rate against offered load]({notes.plot_name})"""


def _load(values: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)
