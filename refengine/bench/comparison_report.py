"""Tables, targets and the plot for a side-by-side run (`side_by_side.Results`) in docs/BENCHMARKS.md."""
from __future__ import annotations

from pathlib import Path

from refengine.bench.plots import tokens_vs_batch
from refengine.bench.report import markdown_table
from refengine.bench.side_by_side import Results, Rounds

# (what, numerator engine, denominator engine or "bound", case, target ratio), per device kind
TARGETS = {
    "cpu": [
        ("batch-1 decode vs llama.cpp F32", "refengine cpu fp32", "llama.cpp F32", ("decode", 1, 128), 1.0),
        ("batch-32 decode vs transformers", "refengine cpu fp32", "transformers fp32", ("decode", 32, 128), 1.3),
        ("fp32 prefill 128 vs transformers", "refengine cpu fp32", "transformers fp32", ("prefill", 128), 1.0),
        ("fp32 prefill 512 vs transformers", "refengine cpu fp32", "transformers fp32", ("prefill", 512), 1.0),
        ("fp32 prefill 2048 vs transformers", "refengine cpu fp32", "transformers fp32", ("prefill", 2048), 1.0),
        ("AMX prefill 128 vs our fp32", "refengine cpu AMX", "refengine cpu fp32", ("prefill", 128), 3.0),
        ("AMX prefill 512 vs our fp32", "refengine cpu AMX", "refengine cpu fp32", ("prefill", 512), 3.0),
        ("AMX prefill 2048 vs our fp32", "refengine cpu AMX", "refengine cpu fp32", ("prefill", 2048), 3.0),
        # no AMX: the dot-product route has no target of its own (the 3x is AMX's)
        ("AVX512-BF16 prefill 128 vs our fp32", "refengine cpu AVX512-BF16", "refengine cpu fp32", ("prefill", 128), None),
        ("AVX512-BF16 prefill 512 vs our fp32", "refengine cpu AVX512-BF16", "refengine cpu fp32", ("prefill", 512), None),
        ("AVX512-BF16 prefill 2048 vs our fp32", "refengine cpu AVX512-BF16", "refengine cpu fp32", ("prefill", 2048), None),
        # decode from bf16 weights is not the F32 comparison; F16 is the like-for-like peer
        ("bf16-weight batch-1 decode vs llama.cpp F16", "refengine cpu bf16 weights", "llama.cpp F16", ("decode", 1, 128), None),
        ("bf16-weight batch-1 decode vs our fp32", "refengine cpu bf16 weights", "refengine cpu fp32", ("decode", 1, 128), None),
    ],
    "cuda": [
        ("batch-1 decode vs transformers eager", "refengine cuda graph", "transformers cuda eager", ("decode", 1, 128), 10.0),
        ("batch-1 decode vs bandwidth bound", "refengine cuda graph", "bound", ("decode", 1, 128), 0.2),
        ("batch-64 decode vs transformers eager", "refengine cuda graph", "transformers cuda eager", ("decode", 64, 128), 3.0),
        ("batch-64 decode vs bandwidth bound", "refengine cuda graph", "bound", ("decode", 64, 128), None),
    ],
}


def decode_table(results: Results, bounds: dict[tuple, float]) -> str:
    engines = list(results)
    cases = sorted({c for by_case in results.values() for c in by_case if c[0] == "decode"},
                   key=lambda c: (c[2], c[1]))
    rows = [[f"{c[1]} × {c[2]}"] + [_fmt(results[e].get(c)) for e in engines] + [_fmt(bounds[c])] for c in cases]
    return markdown_table(["batch × context"] + engines + ["bandwidth bound"], rows)


def prefill_table(results: Results) -> str:
    engines = [e for e in results if any(c[0] == "prefill" for c in results[e])]
    lengths = sorted({c[1] for e in engines for c in results[e] if c[0] == "prefill"})
    rows = [[n] + [_fmt(results[e].get(("prefill", n))) for e in engines] for n in lengths]
    return markdown_table(["prompt tokens"] + engines, rows)


def targets_table(results: Results, bounds: dict[tuple, float], kind: str, rounds: Rounds | None = None) -> str:
    """Each of the issue's targets with the measured ratio (of the medians; with `rounds`, also its
    lowest and highest within one round); rows whose engines or cases did not run are left out
    ("" when none ran)."""
    rows = []
    for what, ours, peer, case, target in TARGETS[kind]:
        mine = results.get(ours, {}).get(case)
        theirs = bounds.get(case) if peer == "bound" else results.get(peer, {}).get(case)
        if mine is None or theirs is None or theirs != theirs:
            continue
        ratio = mine / theirs
        verdict = "—" if target is None else ("met" if ratio >= target else "**missed**")
        goal = "" if target is None else (f"≥ {100 * target:.0f}%" if peer == "bound" else f"≥ {target:g}×")
        row = [what, f"{_fmt(mine)} vs {_fmt(theirs)}", _ratio(ratio, peer)]
        if rounds is not None:
            mine_by_round = rounds[ours][case]
            theirs_by_round = [theirs] * len(mine_by_round) if peer == "bound" else rounds[peer][case]
            each = [m / t for m, t in zip(mine_by_round, theirs_by_round)]
            row.append(f"{_ratio(min(each), peer)} – {_ratio(max(each), peer)}")
        rows.append(row + [goal, verdict])
    if not rows:
        return ""
    head = ["target", "tok/s", "ratio"] + (["ratio within a round (lowest – highest)"] if rounds is not None else [])
    return markdown_table(head + ["wanted", "verdict"], rows)


def _ratio(ratio: float, peer: str) -> str:
    return f"{100 * ratio:.0f}% of bound" if peer == "bound" else f"{ratio:.2f}×"


def plot(results: Results, bounds: dict[tuple, float], path: Path, title: str) -> None:
    series = {}
    for engine, by_case in results.items():
        for (mode, *key), value in by_case.items():
            if mode == "decode":
                batch, context = key
                series.setdefault(engine, {}).setdefault(context, {})[batch] = value
    limits: dict[int, dict[int, float]] = {}
    for (_, batch, context), value in bounds.items():
        limits.setdefault(context, {})[batch] = value
    tokens_vs_batch(series, limits, path, title)


def _fmt(value: float | None) -> str:
    if value is None or value != value:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
