"""Workloads for the simulator: the paper's trace replayed exactly, and generated variants.

- `slinfer_trace`: `../shared/traces/slinfer_workload_128.json` (§6.1). 16 popularity groups of 8
  functions; the 32-, 64- and 128-model loads are the functions with index % 8 < 2, 4, 8
  (2,366 / 4,684 / 9,266 requests, Fig. 21). Each function is one model.
- `azure_llm`: arrivals and lengths of an Azure LLM inference 2023 CSV, each request given to a
  model drawn from a skewed (Zipf) popularity — a different burstiness than the Functions trace.
- `pareto`: BurstGPT-like (§6.5): Poisson arrivals at an aggregate rate, models drawn with
  Pareto-distributed popularity (the top model takes about half), lengths from the conversation CSV.
Every generator takes a seed and is deterministic. Traces are read from `../shared/traces/` beside
the repository, or from `$REFENGINE_TRACES`.
"""
from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TRACES = Path(os.environ.get("REFENGINE_TRACES", REPO_ROOT.parent / "shared" / "traces"))
DEFAULT_TRACE = TRACES / "slinfer_workload_128.json"


@dataclass(frozen=True)
class TraceRequest:
    request_id: str
    model: str
    arrival: float
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Workload:
    name: str
    models: tuple[str, ...]
    requests: tuple[TraceRequest, ...]
    duration: float


def _sorted(requests: list[TraceRequest]) -> tuple[TraceRequest, ...]:
    return tuple(sorted(requests, key=lambda r: (r.arrival, r.request_id)))


def slinfer_trace(n_models: int = 128, path: str | Path | None = None) -> Workload:
    """The SLINFER evaluation workload with `n_models` ∈ {16, 32, …, 128} functions."""
    path = Path(path) if path else DEFAULT_TRACE
    if n_models % 16 or not 16 <= n_models <= 128:
        raise ValueError(f"n_models must be a multiple of 16 in 16..128, got {n_models}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"trace {path} not found; pass --trace PATH") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"trace {path} is not JSON: {e}") from None
    per_group = n_models // 16
    models, requests = [], []
    try:
        for index, fn in enumerate(data["functions"]):
            if index % 8 >= per_group:
                continue
            name = f"fn{index:03d}"
            models.append(name)
            lengths = zip(fn["arrival_s"], fn["input_tokens"], fn["output_tokens"], strict=True)
            for k, (t, i, o) in enumerate(lengths):
                requests.append(TraceRequest(f"{name}-{k}", name, float(t), int(i), int(o)))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"trace {path} is not a SLINFER workload (a 'functions' list, each with "
                         f"'arrival_s', 'input_tokens' and 'output_tokens' lists of equal length): "
                         f"{type(e).__name__}: {e}") from None
    return Workload(f"slinfer-{n_models}", tuple(models), _sorted(requests),
                    60.0 * data.get("minutes", 30))


def _azure_rows(dataset: str, max_context: int) -> list[tuple[float, int, int]]:
    """(seconds from the first row, input, output) of an Azure LLM CSV, fitting `max_context`."""
    path = TRACES / f"AzureLLMInferenceTrace_{dataset}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"Azure LLM trace {path} not found; set REFENGINE_TRACES")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            stamp = datetime.fromisoformat(row["TIMESTAMP"][:26])
            i, o = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            if i + o <= max_context and o >= 1:
                rows.append((stamp.timestamp(), i, o))
    t0 = min(r[0] for r in rows)
    return [(t - t0, i, o) for t, i, o in rows]


def _pick_model(rng: random.Random, models: list[str], weights: list[float]) -> str:
    return rng.choices(models, weights)[0]


def azure_llm(n_models: int = 64, duration: float = 1800.0, seed: int = 0, dataset: str = "conv",
              zipf: float = 1.0, max_context: int = 4096) -> Workload:
    """Azure LLM arrivals and lengths over `n_models` models with Zipf(`zipf`) popularity."""
    rng = random.Random(seed)
    models = [f"m{i:03d}" for i in range(n_models)]
    weights = [1.0 / (k + 1) ** zipf for k in range(n_models)]
    requests = [TraceRequest(f"r{k}", _pick_model(rng, models, weights), t, i, o)
                for k, (t, i, o) in enumerate(_azure_rows(dataset, max_context)) if t < duration]
    return Workload(f"azure-{dataset}-{n_models}", tuple(models), _sorted(requests), duration)


def pareto(rps: float, n_models: int = 64, duration: float = 600.0, seed: int = 0,
           alpha: float = 0.55, max_context: int = 4096) -> Workload:
    """BurstGPT-like: Poisson arrivals at `rps`, Pareto(`alpha`) model popularity (§6.5).

    Popularity is the Pareto quantile function at evenly spaced ranks, so it is the same for every
    seed; alpha = 0.55 gives the top model about half of the requests, as in the artifact's
    segments (48–57 %).
    """
    if rps <= 0 or n_models < 1:
        raise ValueError(f"a Pareto workload needs rps > 0 and at least one model, got {rps} and {n_models}")
    rng = random.Random(seed)
    models = [f"m{i:03d}" for i in range(n_models)]
    weights = [((k + 1) / n_models) ** (-1.0 / alpha) for k in range(n_models)]
    lengths = _azure_rows("conv", max_context)
    requests, t, k = [], 0.0, 0
    while True:
        t += rng.expovariate(rps)
        if t >= duration:
            break
        _, i, o = rng.choice(lengths)
        requests.append(TraceRequest(f"r{k}", _pick_model(rng, models, weights), t, i, o))
        k += 1
    return Workload(f"pareto-{rps:g}rps-{n_models}", tuple(models), _sorted(requests), duration)
