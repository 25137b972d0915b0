"""Per-iteration latency of an instance, from profiled tables (SLINFER §4.2.2).

The scheduler predicts nothing but iteration latency: a prefill iteration as a function of the
tokens it processes, a decode iteration as a function of (batch size, average context length).
Tables are measured per (model profile, hardware) by `cli.py bench profile` on the real kernels, or
taken from the SLINFER artifact for the simulator (`scheduler/profiles/`).

Profile JSON format (`refengine.latency/1`), one file per (model profile, hardware), named
`<profile>__<hardware>.json` (e.g. `llama-2-7b__a100-80gb.json`)::

    {
      "format": "refengine.latency/1",
      "profile": "llama-2-7b",          # ModelSpec.profile
      "hardware": "a100-80gb",          # NodeSpec.hardware
      "unit": "ms",                     # "ms" or "s"; every latency below is in this unit
      "source": "free text: who measured it, how, when",
      "prefill": {"tokens": [1, 128, 256, ...], "latency": [20, 24, 30, ...]},
      "decode": [                       # rows by average context length, ascending
        {"context": 512, "batch": [1, 2, 4, ...], "latency": [14, 14, 15, ...]},
        {"context": 1024, "batch": [...], "latency": [...]}
      ]
    }

Sample points are powers of two in practice (O(log L · log B) runs, §4.2.2), but any ascending
points work. Interpolation (the artifact's rules, §4.2.2): piecewise linear between samples; below
the first sample clamp to its value; above the last sample scale proportionally (y_last · x /
x_last). Decode interpolates over batch inside each context row, then across rows, with the same
rules in both dimensions. Values are the measured latency; safety margins belong to the scheduler
configuration, not to the table.
"""
from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping, Sequence

FORMAT = "refengine.latency/1"
_UNIT_SCALE = {"ms": 1e-3, "s": 1.0}


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y(x): clamp below the first sample, proportional above the last."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1] * x / xs[-1]
    i = bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _ascending(values: Sequence[float], what: str) -> None:
    if len(values) == 0 or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{what} must be a non-empty strictly ascending list, got {list(values)}")


@dataclass(frozen=True)
class DecodeRow:
    context: float
    batch: tuple[float, ...]
    latency: tuple[float, ...]


@dataclass(frozen=True)
class LatencyTable:
    """One (model profile, hardware) table; latencies held in seconds."""

    profile: str
    hardware: str
    prefill_tokens: tuple[float, ...]
    prefill_latency: tuple[float, ...]
    decode_rows: tuple[DecodeRow, ...]
    source: str = ""
    _contexts: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_contexts", tuple(r.context for r in self.decode_rows))
        _ascending(self.prefill_tokens, "prefill.tokens")
        if len(self.prefill_tokens) != len(self.prefill_latency):
            raise ValueError("prefill.tokens and prefill.latency differ in length")
        _ascending([r.context for r in self.decode_rows], "decode[].context")
        for row in self.decode_rows:
            _ascending(row.batch, f"decode row {row.context} batch")
            if len(row.batch) != len(row.latency):
                raise ValueError(f"decode row {row.context}: batch and latency differ in length")

    def prefill(self, tokens: float) -> float:
        """Seconds for one prefill iteration over `tokens` tokens (prompt + resumed tokens)."""
        return interpolate(self.prefill_tokens, self.prefill_latency, tokens)

    def decode(self, batch: float, avg_context: float) -> float:
        """Seconds for one decode iteration of `batch` sequences of mean length `avg_context`.

        Only the two rows around `avg_context` are interpolated (this runs once per grant).
        """
        rows = self.decode_rows
        first, last = rows[0], rows[-1]
        if avg_context <= first.context:
            return interpolate(first.batch, first.latency, batch)
        if avg_context >= last.context:
            return interpolate(last.batch, last.latency, batch) * avg_context / last.context
        i = bisect_right(self._contexts, avg_context)
        lo, hi = rows[i - 1], rows[i]
        y0 = interpolate(lo.batch, lo.latency, batch)
        y1 = interpolate(hi.batch, hi.latency, batch)
        return y0 + (y1 - y0) * (avg_context - lo.context) / (hi.context - lo.context)


    @classmethod
    def from_dict(cls, data: Mapping) -> "LatencyTable":
        if data.get("format") != FORMAT:
            raise ValueError(f"latency table format must be {FORMAT!r}, got {data.get('format')!r}")
        try:
            scale = _UNIT_SCALE[data.get("unit", "ms")]
        except KeyError:
            raise ValueError(f"unit must be one of {sorted(_UNIT_SCALE)}") from None
        rows = tuple(
            DecodeRow(float(r["context"]), tuple(map(float, r["batch"])),
                      tuple(v * scale for v in r["latency"]))
            for r in data["decode"]
        )
        return cls(
            profile=data["profile"], hardware=data["hardware"],
            prefill_tokens=tuple(map(float, data["prefill"]["tokens"])),
            prefill_latency=tuple(v * scale for v in data["prefill"]["latency"]),
            decode_rows=rows, source=data.get("source", ""),
        )

    def to_dict(self) -> dict:
        """The JSON form (in ms), as `bench profile` writes it."""
        ms = lambda values: [round(v * 1e3, 6) for v in values]  # noqa: E731
        return {
            "format": FORMAT, "profile": self.profile, "hardware": self.hardware, "unit": "ms",
            "source": self.source,
            "prefill": {"tokens": list(self.prefill_tokens), "latency": ms(self.prefill_latency)},
            "decode": [{"context": r.context, "batch": list(r.batch), "latency": ms(r.latency)}
                       for r in self.decode_rows],
        }


def profile_filename(profile: str, hardware: str) -> str:
    return f"{profile}__{hardware}.json"


def load_table(path: str | Path) -> LatencyTable:
    with open(path, encoding="utf-8") as f:
        try:
            return LatencyTable.from_dict(json.load(f))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a valid latency table: {e}") from e


class CostModel:
    """The tables the scheduler predicts with, looked up by (model profile, hardware)."""

    def __init__(self, tables: Iterable[LatencyTable]):
        self._tables = {(t.profile, t.hardware): t for t in tables}

    def table(self, profile: str, hardware: str) -> LatencyTable:
        try:
            return self._tables[(profile, hardware)]
        except KeyError:
            raise KeyError(f"no latency table for model profile {profile!r} on {hardware!r}; "
                           f"have {sorted(self._tables)}") from None

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._tables

    @classmethod
    def from_dirs(cls, *dirs: str | Path) -> "CostModel":
        """Every `*.json` table in `dirs`; a later directory overrides an earlier one."""
        return cls(load_table(p) for d in dirs for p in sorted(Path(d).glob("*.json")))

    @classmethod
    def shipped(cls) -> "CostModel":
        """The SLINFER artifact's tables shipped in `scheduler/profiles/` (§4.2.2)."""
        root = resources.files("scheduler") / "profiles"
        return cls(LatencyTable.from_dict(json.loads(p.read_text(encoding="utf-8")))
                   for p in sorted(root.iterdir(), key=lambda p: p.name)
                   if p.name.endswith(".json"))
