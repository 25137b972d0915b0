"""`bench migrate`: the pause a client sees when its running request is moved to another device, by
live migration (ServerlessLLM §4: the destination rebuilds the KV from the tokens, in rounds while
the source keeps streaming, then takes over) or by drop-and-re-prefill (SLINFER §4.4.1: evicted,
placed again, prefilled from scratch), on the live runtime with the real SmolLM2 weights.

The scene (the live-runtime tests preempt in it too): two logical CPU devices and a cost model
pinned so the scheduler's choices follow from batch sizes alone (a decode iteration 0.1 s per
sequence, a prefill 1 ms per token, TPOT 0.4 s: a device's instances hold three sequences). A
request of `context` prompt tokens streams on cpu:0, beside a warm idle instance of another model;
after a few tokens a burst of three requests for that model lands on cpu:0 and overloads its decode
time, so the streaming request's instance (the smaller batch) is preempted and the request moves to
a new instance on cpu:1. Only the choice is pinned: every step, load and copy runs for real. The
destination is cold in both modes, its weights views of the host cache as in `serve` (a start-up of
a few ms): a re-prefill then prefills the whole context behind the burst's prefills; a migration
rebuilds the KV while the source streams (the two logical devices share the machine's cores, so the
rebuild still slows the source).
"""
from __future__ import annotations

import asyncio
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from models.catalogue import DEFAULT_MODEL, Catalogue
from refengine.bench.report import markdown_table
from refengine.engine.sequence import SamplingParams
from refengine.runtime.api import Finished, TokenChunk
from refengine.runtime.devices import DeviceSpec
from refengine.runtime.live import LiveRuntime
from refengine.runtime.options import RuntimeOptions
from scheduler.costmodel import FORMAT, profile_filename
from scheduler.slo import SloPolicy

PINNED_TABLE = {"format": FORMAT, "unit": "s",
                "source": "pinned so that placement follows from batch sizes alone",
                "prefill": {"tokens": [1, 100_000], "latency": [0.001, 100.0]},
                "decode": [{"context": 100_000, "batch": [1, 64], "latency": [0.1, 6.4]}]}
# The moved request's output: it must outlast the rebuild, or it ends at the source before the
# hand-over. On 2 cores the rebuild of 1,024 tokens takes ~2.2 s while the source streams a token
# every 25-40 ms: with 96 tokens (enough at 12-04's 47 ms) the 12-07 run was not moved at 1,024.
MAX_TOKENS = 256
PINNED_SLO = SloPolicy(ttft_floor=60.0, ttft_cap=60.0, tpot=0.4)
MOVED, BURST = f"{DEFAULT_MODEL}-r1", DEFAULT_MODEL
TEXT = ("The river runs past the old mill, under the stone bridge and out across the meadows, where "
        "the herons wait in the shallows for the evening light. ")


def pinned_home(model_home: Path, directory: Path, hardware: str, weights: str = DEFAULT_MODEL) -> Path:
    """A model home sharing `model_home`'s prepared weights, whose latency table for `weights` on
    `hardware` is `PINNED_TABLE`."""
    home = directory / "home"
    (home / "profiles").mkdir(parents=True)
    (home / "models").symlink_to(model_home / "models")
    table = {**PINNED_TABLE, "profile": weights, "hardware": hardware}
    (home / "profiles" / profile_filename(weights, hardware)).write_text(json.dumps(table))
    return home


@dataclass(frozen=True)
class MoveRun:
    context: int
    migration: bool
    pause_s: float             # the largest gap between consecutive tokens once the burst arrived
    typical_gap_s: float       # the median gap over the same stretch
    handover_gap_s: float      # migration: the gap before the destination's first token (else nan)
    moved: bool                # the runtime did move it as asked (a migration, or an eviction)
    start_up_s: float          # the destination's start-up the request waited for (re-prefill only)
    tokens: tuple[int, ...]


async def _drain(rt: LiveRuntime, model: str, prompt: str) -> None:
    async for _ in rt.generate(model, rt.tokenizer(model).encode(prompt), SamplingParams(max_tokens=8)):
        pass


async def _one(options: RuntimeOptions, context: int, max_tokens: int, burst_after: int) -> MoveRun:
    rt = LiveRuntime(options)
    await rt.start()
    try:
        await _drain(rt, BURST, "Hello")        # warm beside it: no cold start blocks cpu:0 later
        ids = rt.tokenizer(MOVED).encode(TEXT)
        prompt = (ids * (context // len(ids) + 1))[:context]
        # per token: when it arrived, and whether the migration was done (it is counted once the
        # destination holds the request: after the source's last token reached the client, before
        # the destination makes its first)
        times, handed, tokens, burst, finished = [], [], [], None, None
        async for event in rt.generate(MOVED, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)):
            if isinstance(event, TokenChunk):
                times.append(time.perf_counter())
                handed.append(rt.counters["migrations"] > 0)
                tokens.append(event.token_id)
                if len(tokens) == burst_after:
                    burst = asyncio.gather(*(_drain(rt, BURST, p) for p in ("One", "Two", "Three")))
            elif isinstance(event, Finished):
                finished = event
        await burst
        status = rt.status()
    finally:
        await rt.stop()
    gaps = [b - a for a, b in zip(times[burst_after - 1:], times[burst_after:])]
    first = handed.index(True) if True in handed else None
    moved = status.migrations == 1 if options.migration else status.preemptions >= 1
    return MoveRun(context, options.migration, max(gaps), statistics.median(gaps),
                   times[first] - times[first - 1] if first else math.nan, moved,
                   finished.cold_start_grace_s, tuple(tokens))


def run(model_home: Path, backend: str, contexts: tuple[int, ...], repeats: int, max_tokens: int = MAX_TOKENS,
        burst_after: int = 4, progress=print) -> list[MoveRun]:
    """Both modes at each context, `repeats` times, modes and contexts taking turns; a first run of
    each mode warms the kernels up and is not kept."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        home = pinned_home(model_home, Path(tmp), f"cpu-{backend}")
        devices = [DeviceSpec("cpu:0", 8 << 30), DeviceSpec("cpu:1", 8 << 30)]
        for r in range(repeats + 1):
            for context in contexts if r else contexts[:1]:
                for migration in (True, False):
                    options = RuntimeOptions(Catalogue.default(replicas=1), devices, keep_alive_s=30.0,
                                             backend=backend, home=home, slo=PINNED_SLO, migration=migration)
                    result = asyncio.run(_one(options, context, max_tokens, burst_after))
                    handover = f", hand-over gap {result.handover_gap_s * 1e3:.0f} ms" if migration else ""
                    progress(f"{'warm-up' if not r else f'round {r}'}: context {context} "
                             f"{'migration' if migration else 're-prefill'}: largest gap {result.pause_s * 1e3:.0f} ms"
                             f"{handover}, typical gap {result.typical_gap_s * 1e3:.0f} ms"
                             f"{'' if result.moved else ' (NOT MOVED)'}")
                    if r:
                        runs.append(result)
    return runs


def table(runs: list[MoveRun]) -> str:
    """Medians per context: the migration's hand-over gap and largest gap, the re-prefill's pause
    (its largest gap) and the part of it spent waiting for the destination's start-up, the typical
    gap; whether every run gave the same tokens and was moved as asked."""
    rows = []
    for context in sorted({r.context for r in runs}):
        mine = [r for r in runs if r.context == context]
        moving = [r for r in mine if r.migration]
        dropping = [r for r in mine if not r.migration]
        ms = lambda values: statistics.median(values) * 1e3  # noqa: E731
        handover, pause = ms([r.handover_gap_s for r in moving]), ms([r.pause_s for r in dropping])
        rows.append([context, f"{handover:.0f}", f"{ms([r.pause_s for r in moving]):.0f}", f"{pause:.0f}",
                     f"{pause / handover:.1f}×", f"{ms([r.start_up_s for r in dropping]):.0f}",
                     f"{ms([r.typical_gap_s for r in mine]):.0f}",
                     "yes" if len({r.tokens for r in mine}) == 1 else "NO",
                     "yes" if all(r.moved for r in mine) else "NO"])
    return markdown_table(["context tokens", "migration: hand-over gap ms", "migration: largest gap ms",
                           "re-prefill: pause ms", "pause / hand-over gap", "re-prefill: of which start-up ms",
                           "typical gap ms", "same tokens", "moved as asked"], rows)


def report(runs: list[MoveRun], backend: str, repeats: int, load_before: tuple[float, ...],
           load_after: tuple[float, ...]) -> str:
    """The BENCHMARKS.md section: how it was measured (the scene is this module's docstring), the
    load on the shared machine, the table."""
    scene = " ".join(__doc__.split("\n\n")[1].split())
    load = lambda avg: "/".join(f"{x:.1f}" for x in avg)  # noqa: E731
    return (f"Command: `python cli.py bench migrate --backend {backend}`; SmolLM2-135M-Instruct, {backend} "
            f"backend, median of {repeats} runs per cell. {scene} Gaps are between consecutive tokens as the "
            f"client receives them, from the burst on: the hand-over gap is the one before the destination's "
            f"first token; a re-prefill's pause is its largest gap; the typical gap is the median one (both "
            f"modes). A migration's largest gap can exceed its hand-over: it falls while the burst is "
            f"prefilled on cpu:0 and the destination rebuilds on the shared cores. Load average (1/5/15 min) "
            f"{load(load_before)} before, {load(load_after)} after: the machine is shared with other work, "
            f"so absolute times are noisy.\n\n{table(runs)}")
