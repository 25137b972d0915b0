"""`python cli.py bench serve`: the live server under a replayed trace, SLINFER beside the exclusive
(ServerlessLLM-style) baseline, at several offered loads and numbers of models.

Every (models, scheduler, load) point gets a fresh server process, one warm-up request (then an idle
wait until the keep-alive has scaled it back to zero), the open-loop replay with `/metrics` sampled,
and the server's peak memory. The device's latency profile is found or measured once, before the
first server starts, so no point pays for profiling and all of them schedule with the same table.
"""
from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from models.catalogue import DEFAULT_MODEL
from refengine.bench.serve_summary import PointSummary, ServerFigures, summarize
from refengine.bench.serve_workload import LENGTH_SCALE, PASSAGE, serve_workload, served_names
from refengine.engine.loader import ensure_prepared
from refengine.engine.tokenizer import Tokenizer
from refengine.runtime.devices import parse_devices
from refengine.runtime.profile import FULL_GRID, device_profile
from refengine.store.cache import model_home

SCHEDULERS = ("slinfer", "exclusive")
DEFAULT_LOADS = (0.25, 0.5, 1.0)               # 2 cores: capacity is well under 1 req/s


@dataclass(frozen=True)
class ServeBench:
    """What one `bench serve` run measures (every combination of models × schedulers × loads)."""

    models: tuple[int, ...] = (8, 16)
    schedulers: tuple[str, ...] = SCHEDULERS
    loads: tuple[float, ...] = DEFAULT_LOADS       # offered requests/s
    duration_s: float = 60.0                       # trace seconds per point
    drain_s: float = 30.0                          # after the last arrival, before stragglers time out
    devices: str = "cpu"
    backend: str | None = None
    keep_alive_s: float = 1.0                      # the server's defaults (SLINFER's 1 s), stated in the doc
    cpu_memory: str = "8GiB"
    gpu_memory: str = "16GiB"
    host_cache: str = "4GiB"                       # the server's model store host tier ("0": disk every time)
    seed: int = 0
    length_scale: float = LENGTH_SCALE
    home: Path | None = None                       # model cache (default $REFENGINE_HOME)
    profile_grid: dict = field(default_factory=lambda: FULL_GRID)   # used only if a profile is missing

    def points(self) -> list[tuple[int, str, float]]:
        return list(itertools.product(self.models, self.schedulers, self.loads))

    def serve_args(self, models: int, scheduler: str) -> list[str]:
        backend = ["--backend", self.backend] if self.backend else []
        return ["--replicas", str(models - 1), "--scheduler", scheduler, "--devices", self.devices, *backend,
                "--keep-alive", str(self.keep_alive_s), "--cpu-memory", self.cpu_memory, "--gpu-memory", self.gpu_memory,
                "--host-cache", self.host_cache]


def prepare(bench: ServeBench, echo: Callable[[str], None]) -> list[int]:
    """Prepare the weights and find or measure each device's profile (once for the whole run); the
    prompt passage's token ids."""
    home = bench.home or model_home()
    files = ensure_prepared(DEFAULT_MODEL, home)
    for device in parse_devices(bench.devices):
        path, _ = device_profile(DEFAULT_MODEL, device, bench.backend, home, bench.profile_grid)
        echo(f"latency profile for {device}: {path}")
    return Tokenizer(files).encode(PASSAGE)


def run_point(bench: ServeBench, models: int, scheduler: str, load: float, passage: list[int],
              log_dir: Path) -> PointSummary:
    # httpx and openai (the bench extra): only when a benchmark runs, so `cli.py serve` needs neither
    from refengine.bench.serve_client import replay_sampled
    from refengine.bench.serve_process import ServerProcess
    workload = serve_workload(served_names(models), load, bench.duration_s, bench.seed, bench.length_scale)
    log = log_dir / f"serve-{models}-{scheduler}-{load:g}.log"
    with ServerProcess(bench.serve_args(models, scheduler), log, bench.home) as server:
        server.warm_up(workload.models[0])
        records, samples = asyncio.run(replay_sampled(server.url, workload, list(passage), bench.drain_s))
        rss = server.peak_rss_bytes()
    figures = ServerFigures(rss, samples.peak_device_memory_bytes, samples.peak_instances_loaded,
                            samples.counted("cold_starts"), samples.counted("preemptions"))
    return summarize(models, scheduler, load, bench.duration_s, records, figures)


def run(bench: ServeBench, echo: Callable[[str], None] = print) -> list[PointSummary]:
    """Every point in turn, with a progress line before and after each."""
    passage = prepare(bench, echo)
    points, results = bench.points(), []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as logs:
        for k, (models, scheduler, load) in enumerate(points, 1):
            echo(f"[{k}/{len(points)}] {models} models, {scheduler}, {load:g} req/s for {bench.duration_s:g} s ...")
            started = time.monotonic()
            summary = run_point(bench, models, scheduler, load, passage, Path(logs))
            echo(f"    SLO met {summary.slo_met}/{summary.requests} ({summary.slo_met_rate:.0%}), "
                 f"TTFT p50 {summary.ttft_p50_s:.2f} s, TPOT p50 {summary.tpot_p50_s:.3f} s, failures "
                 f"{sum(summary.failures.values())}, {time.monotonic() - started:.0f} s")
            results.append(summary)
    return results
