"""`python cli.py bench contention`: CPU steps beside busy processes, on the thread count the tuner
picks (`kernels.cpu_threads`) and on fixed counts.

The project's premise is shared hardware, and a CPU shared with another busy process behaves
unlike a quiet one: there, a step spread over every core waits at each barrier for the thread that
is not running. Each busy process here is a Python loop that never sleeps, the worst neighbour.

Every figure is the mean over all the steps of a run, not their median: the tuner's tries of other
counts are part of what it costs.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numba
import numpy as np

from kernels.cpu_threads import ThreadTunedModel
from kernels.thread_tuner import candidate_counts
from refengine.bench import steps
from refengine.bench.report import markdown_table

TUNED = "tuned"


@dataclass(frozen=True)
class Case:
    kind: str          # "decode" or "prefill"
    batch: int         # sequences (decode) or 1 (prefill)
    tokens: int        # cached tokens per sequence (decode) or prompt tokens (prefill)

    @property
    def label(self) -> str:
        return f"decode batch {self.batch} × {self.tokens}" if self.kind == "decode" else f"prefill {self.tokens}"

    def step(self, model: Any):
        rng = np.random.default_rng(0)
        if self.kind == "decode":
            return steps.decode_step(model.config, self.batch, self.tokens, rng)
        return steps.prefill_step(model.config, self.tokens, rng)

    @property
    def tokens_per_step(self) -> int:
        return self.batch if self.kind == "decode" else self.tokens

    def steps(self, decode_steps: int) -> int:
        """A run's steps: a prefill of 128 tokens takes ~10 decode steps' time, so a quarter as many."""
        return decode_steps if self.kind == "decode" else max(decode_steps // 4, 10)


DEFAULT_CASES = (Case("decode", 1, 128), Case("decode", 8, 128), Case("prefill", 1, 128))


@contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """`count` processes that each keep a core busy until the block ends."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.2 if count else 0)      # let them start spinning
        yield
    finally:
        for p in spinners:
            p.kill()
        for p in spinners:
            p.wait()


def policies() -> list[str]:
    """The fixed thread counts (all of the pool, then halvings), then the tuner."""
    return [str(n) for n in candidate_counts(numba.get_num_threads())] + [TUNED]


def tokens_per_s(model: Any, case: Case, policy: str, num_steps: int) -> float:
    """Mean tokens/s over `num_steps` steps of `case` on `model` (a `CpuDecodeModel`), run by the
    tuner (a fresh one, so its first tries count) or on a fixed thread count."""
    step = case.step(model)
    k_cache, v_cache = steps.random_cache(model, int(step.block_tables.size))
    threads = numba.get_num_threads()
    runner = ThreadTunedModel(model) if policy == TUNED else model
    numba.set_num_threads(threads if policy == TUNED else int(policy))
    try:
        started = time.perf_counter()
        for _ in range(num_steps):
            runner.forward(step, k_cache, v_cache)
        return num_steps * case.tokens_per_step / (time.perf_counter() - started)
    finally:
        numba.set_num_threads(threads)


def run(model: Any, busy_counts: tuple[int, ...], cases: tuple[Case, ...], num_steps: int, rounds: int,
        progress: Callable[[str], None]) -> dict[tuple[int, Case, str], float]:
    """Median tokens/s over `rounds` per (busy processes, case, policy), the policies taking turns
    within each round (a VM's speed drifts over minutes). Every kernel is compiled at every count
    first."""
    for case in cases:
        for policy in policies()[:-1]:
            tokens_per_s(model, case, policy, 2)
    by_round: dict[tuple[int, Case, str], list[float]] = {}
    for busy in busy_counts:
        with busy_processes(busy):
            for r in range(rounds):
                for case in cases:
                    for policy in policies()[::1 if r % 2 == 0 else -1]:
                        rate = tokens_per_s(model, case, policy, case.steps(num_steps))
                        by_round.setdefault((busy, case, policy), []).append(rate)
                        progress(f"round {r + 1}: {busy} busy, {case.label}, {policy} thread(s): {rate:.1f} tok/s")
    return {key: statistics.median(rates) for key, rates in by_round.items()}


def report(results: dict[tuple[int, Case, str], float], num_steps: int, rounds: int) -> str:
    """One row per (busy processes, case): tokens/s per policy, and the tuner against the best fixed count."""
    names = policies()
    rows = []
    for busy, case in dict.fromkeys((b, c) for b, c, _ in results):
        rates = {p: results[(busy, case, p)] for p in names}
        best_fixed = max(rates[p] for p in names[:-1])
        rows.append([busy, case.label, *(f"{rates[p]:.1f}" for p in names),
                     f"{rates[TUNED] / rates[names[0]]:.2f}×", f"{rates[TUNED] / best_fixed:.2f}×"])
    header = ["busy processes", "step", *(f"{p} thread{'s' if p != '1' else ''}" for p in names[:-1]),
              "tuned", f"tuned ÷ {names[0]} threads", "tuned ÷ best fixed"]
    return (f"Tokens/s: in each of {rounds} rounds the mean over {num_steps} decode steps or "
            f"{DEFAULT_CASES[-1].steps(num_steps)} prefills (the tuner's tries of other counts included), "
            f"the policies taking turns; the median of the rounds. Each busy process is a Python loop that "
            f"never sleeps.\n\n{markdown_table(header, rows)}")
