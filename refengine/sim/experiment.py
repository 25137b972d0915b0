"""One simulated experiment, described by a picklable spec, and a pool to run many of them.

A `RunSpec` names the system (a scheduler preset), the model size and count, the cluster, the
workload and, optionally, the storage tiers and loading style (`loading.py`); `run` returns
every metric as plain JSON-ready data. `run_many` spreads specs over processes (the simulator is
single-threaded Python; the machine has 2 cores).
"""
from __future__ import annotations

import math
import multiprocessing
import random
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Callable, Iterable

from refengine.sim.loading import GiB, Storage
from refengine.sim.simulator import Simulation
from refengine.sim.workload import Workload, azure_llm, pareto, slinfer_trace
from scheduler import preset


@dataclass(frozen=True)
class RunSpec:
    system: str = "slinfer"
    size: str = "7b"
    models: int = 128
    cpus: int = 4
    gpus: int = 4
    workload: str = "slinfer"          # slinfer | azure | pareto
    trace: str | None = None
    rps: float = 1.0
    seed: int = 0
    duration: float | None = None      # keep only arrivals before this time (s)
    overrides: tuple[tuple[str, float | str], ...] = field(default_factory=tuple)
    loading: str | None = None         # local | multicast: simulated tiers (None: legacy loads)
    host_cache_gib: float | None = None  # per node; None: every model cached (with tiers)
    leave_rate: float = 0.0            # share of clients that leave early (`cancellations`)

    @property
    def label(self) -> str:
        extra = "".join(f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}"
                        for k, v in self.overrides)
        if self.storage() is not None:
            cache = "all" if self.host_cache_gib is None else f"{self.host_cache_gib:g}GiB"
            extra += f" loading={self.loading or 'local'} host-cache={cache}"
        if self.leave_rate:
            extra += f" leave-rate={self.leave_rate:g}"
        return f"{self.system} {self.models}x{self.size} {self.cpus}C+{self.gpus}G{extra}"

    def storage(self) -> Storage | None:
        """The tier model, if this run uses one (either option given)."""
        if self.loading is None and self.host_cache_gib is None:
            return None
        cache = None if self.host_cache_gib is None else int(self.host_cache_gib * GiB)
        return Storage(loading=self.loading or "local", host_cache_bytes=cache)

    def build_workload(self) -> Workload:
        if self.workload == "slinfer":
            w = slinfer_trace(self.models, self.trace)
        elif self.workload == "azure":
            w = azure_llm(self.models, self.duration or 1800.0, self.seed)
        elif self.workload == "pareto":
            w = pareto(self.rps, self.models, self.duration or 600.0, self.seed)
        else:
            raise ValueError(f"unknown workload {self.workload!r} (slinfer, azure, pareto)")
        if self.duration is not None and self.duration < w.duration:
            kept = tuple(r for r in w.requests if r.arrival < self.duration)
            w = Workload(w.name, w.models, kept, self.duration)
        return w


    def cancellations(self, workload: Workload) -> dict[str, int]:
        """Each client leaves with probability `leave_rate`, after a number of tokens drawn
        uniformly from none to all but its last (a stream of its own, from `seed`)."""
        rnd = random.Random(f"leave:{self.seed}")
        return {r.request_id: rnd.randrange(max(r.output_tokens, 1)) for r in workload.requests
                if rnd.random() < self.leave_rate}


def _finite(x):
    """JSON has no infinity: drops (TTFT = inf) are written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def run(spec: RunSpec, on_progress: Callable[[float], None] | None = None,
        log: IO[str] | None = None) -> dict:
    """Simulate one spec; every metric, JSON-ready. `log` receives one JSON line per event."""
    workload = spec.build_workload()
    config = preset(spec.system, **dict(spec.overrides))
    start = time.perf_counter()
    sim = Simulation(workload, config, size=spec.size, cpus=spec.cpus, gpus=spec.gpus,
                     storage=spec.storage(), log=log, cancellations=spec.cancellations(workload))
    rec = sim.run(on_progress)
    wall = time.perf_counter() - start
    return _finite({
        "spec": asdict(spec), "label": spec.label, "wall_s": wall,
        "summary": rec.summary(),
        "ttft_cdf": rec.ttft_cdf(),
        "nodes_used": rec.nodes_used,
        "batch_cdf": {kind: rec.batch_cdf(kind) for kind in ("cpu", "gpu")},
    })


def run_many(specs: Iterable[RunSpec], jobs: int = 2,
             on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Run specs in `jobs` processes; results in the order of `specs`."""
    specs = list(specs)
    if jobs <= 1 or len(specs) == 1:
        results = []
        for s in specs:
            results.append(run(s))
            if on_done:
                on_done(results[-1])
        return results
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        results = []
        for r in pool.imap(run, specs):
            results.append(r)
            if on_done:
                on_done(r)
        return results
