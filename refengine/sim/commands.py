"""`simulate`: replay a workload on a simulated SLINFER cluster and report the paper's metrics.

    python cli.py simulate                          # 128 × 7B, 4 CPU + 4 GPU, all four systems
    python cli.py simulate --models 32 --size 3b --systems slinfer,sllm
    python cli.py simulate --workload pareto --rps 4 --models 64
    python cli.py simulate --reproduce              # the Fig. 22 grid → docs/PAPER_REPRODUCTION.md
    python cli.py simulate --systems slinfer --host-cache 32 --loading local,multicast
                                                    # ServerlessLLM vs λScale loading, same trace
    python cli.py simulate --compare-loading        # that comparison → docs/PAPER_REPRODUCTION.md

Writes `metrics.json` (every metric of every run) and PNG plots to `--out`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import click
from tqdm import tqdm

from refengine.sim import plots
from refengine.sim.experiment import RunSpec, run, run_many
from refengine.sim.report import summary_table
from refengine.sim.workload import slinfer_trace
from scheduler import PRESETS

DEFAULT_SYSTEMS = "slinfer,sllm,sllm+c,sllm+c+s"
LOADINGS = ("local", "multicast")


def _systems(value: str) -> list[str]:
    names = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in names if s not in PRESETS]
    if unknown or not names:
        raise click.BadParameter(f"unknown system(s) {unknown}; choose from {sorted(PRESETS)}")
    return names


def _loadings(value: str | None) -> list[str | None]:
    if value is None:
        return [None]
    names = [s.strip() for s in value.split(",") if s.strip()]
    if not names or any(n not in LOADINGS for n in names):
        raise click.BadParameter(f"unknown loading {value!r}; choose from {', '.join(LOADINGS)}")
    return names


def _run_with_bar(spec: RunSpec, log_path: Path | None) -> dict:
    """One run with a progress bar over simulated time."""
    total = spec.duration or spec.build_workload().duration
    with tqdm(total=math.ceil(total), unit="sim-s", desc=spec.label, leave=False) as bar:
        def progress(t: float) -> None:
            step = min(int(t), bar.total) - bar.n
            if step > 0:
                bar.update(step)
        if log_path is None:
            return run(spec, progress)
        with open(log_path, "w", encoding="utf-8") as log:
            return run(spec, progress, log)


@click.command("simulate")
@click.option("--systems", default=DEFAULT_SYSTEMS, show_default=True,
              help="Comma-separated scheduler presets.")
@click.option("--size", type=click.Choice(["3b", "7b", "8b", "13b"]), default="7b",
              show_default=True, help="Model size (every model is a replica of it, §6.1).")
@click.option("--models", type=click.IntRange(1), default=128, show_default=True, help="Number of models.")
@click.option("--cpus", type=click.IntRange(0), default=4, show_default=True)
@click.option("--gpus", type=click.IntRange(0), default=4, show_default=True)
@click.option("--workload", type=click.Choice(["slinfer", "azure", "pareto"]), default="slinfer",
              show_default=True, help="The paper's trace, Azure LLM arrivals, or BurstGPT-like.")
@click.option("--trace", type=click.Path(dir_okay=False, path_type=Path),
              help="SLINFER workload JSON (default ../shared/traces/slinfer_workload_128.json).")
@click.option("--rps", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True, help="Pareto workload rate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--duration", type=click.FloatRange(0, min_open=True), help="Only arrivals before this many seconds.")
@click.option("--watermark", type=click.FloatRange(0), help="Override the KV watermark w (§4.3.2).")
@click.option("--keep-alive", type=click.FloatRange(0), help="Override the keep-alive (s).")
@click.option("--shadow", type=click.Choice(["edf", "full"]), help="Shadow-validation fidelity.")
@click.option("--migration", is_flag=True, default=None,
              help="Preemption migrates requests live where cheaper (ServerlessLLM).")
@click.option("--migration-rounds", type=click.IntRange(1), metavar="N",
              help="With --migration: rebuild in up to N rounds, each taking the tokens the "
              "source made during the last, so the hand-over has fewer to catch up.")
@click.option("--leave-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of clients that leave early, after a random number of their tokens "
              "(the SLO rate is of those that stay).")
@click.option("--loading", help="Simulated tiers and loading: local (ServerlessLLM: each node "
              "from its fastest tier) or multicast (λScale: GPU-to-GPU multicast, execute while "
              "loading); comma-separated to compare. Default: the legacy fixed load cost.")
@click.option("--host-cache", "host_cache", type=click.FloatRange(0), metavar="GIB",
              help="Host-memory cache per node, LRU (implies tiers; default with tiers: every "
              "model cached, SLINFER's assumption).")
@click.option("--jobs", type=click.IntRange(1), default=2, show_default=True,
              help="Runs in parallel processes.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("sim-out"),
              show_default=True, help="Directory for metrics.json and plots.")
@click.option("--plots/--no-plots", "make_plots", default=True, show_default=True)
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON lines of every event and action (single system only).")
@click.option("--reproduce", is_flag=True,
              help="Run the paper's grid and write docs/PAPER_REPRODUCTION.md.")
@click.option("--compare-loading", is_flag=True,
              help="Compare local (ServerlessLLM) and multicast (λScale) loading on the same "
              "traces; writes a section of docs/PAPER_REPRODUCTION.md.")
def simulate(systems, size, models, cpus, gpus, workload, trace, rps, seed, duration, watermark,
             keep_alive, shadow, migration, migration_rounds, leave_rate, loading, host_cache,
             jobs, out, make_plots, log_path, reproduce, compare_loading) -> None:
    """Simulate serverless LLM serving on CPU + GPU nodes (SLINFER §6)."""
    if reproduce:
        from refengine.sim.reproduce import reproduce as run_reproduction
        run_reproduction(out=out, jobs=jobs, trace=str(trace) if trace else None)
        return
    if compare_loading:
        from refengine.sim.loading_report import compare_loading as run_comparison
        click.echo(run_comparison(out=out, jobs=jobs, trace=str(trace) if trace else None))
        return
    if trace is not None and not trace.is_file():
        raise click.ClickException(f"trace file {trace} does not exist")
    if workload == "slinfer" and (models % 16 or not 16 <= models <= 128):
        raise click.ClickException("the SLINFER trace has 16..128 models in steps of 16")
    if workload == "slinfer":
        try:        # read once here, so a damaged trace is one line before any run starts
            slinfer_trace(models, trace)
        except (FileNotFoundError, ValueError) as e:
            raise click.ClickException(str(e)) from None
    if migration_rounds is not None and not migration:
        raise click.UsageError("--migration-rounds needs --migration")
    if cpus + gpus == 0:
        raise click.UsageError("a cluster needs at least one node: give --cpus or --gpus above 0")
    names = _systems(systems)
    loadings = _loadings(loading)
    if log_path is not None and len(names) * len(loadings) != 1:
        raise click.ClickException("--log needs exactly one system and loading")
    overrides = tuple((k, v) for k, v in (("watermark", watermark), ("keep_alive", keep_alive),
                                          ("shadow", shadow), ("migration", migration),
                                          ("migration_rounds", migration_rounds))
                      if v is not None)
    specs = [RunSpec(s, size, models, cpus, gpus, workload, str(trace) if trace else None, rps,
                     seed, duration, overrides, ld, host_cache, leave_rate)
             for s in names for ld in loadings]
    try:
        if jobs == 1 or len(specs) == 1:
            results = [_run_with_bar(s, log_path) for s in specs]
        else:
            with tqdm(total=len(specs), unit="run", desc="simulating") as bar:
                results = run_many(specs, jobs, on_done=lambda _: bar.update())
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(summary_table(results))
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    written = [out / "metrics.json"]
    if make_plots:
        written += plots.write_all(results, out)
    click.echo("wrote " + ", ".join(str(p) for p in written))

if __name__ == "__main__":
    simulate()
