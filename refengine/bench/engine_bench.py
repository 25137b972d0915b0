"""Throughput of the engine itself: decode tokens/s at a batch size and context, prefill tokens/s.

Both drive a real `Instance` through `step()`, exactly as serving does; only the timed steps count,
and the figure quoted is the median step.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

from models.llama import LlamaModel
from refengine.engine.instance import Instance
from refengine.engine.sequence import SamplingParams
from refengine.engine.step_result import StepKind


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float      # from the median step
    median_step_s: float
    steps: int


def _random_prompt(model: LlamaModel, length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, model.config.vocab_size, length).tolist()


def measure_decode(model: LlamaModel, batch: int, prompt_len: int, new_tokens: int) -> Throughput:
    """B sequences of prompt_len tokens are prefilled (untimed), then every decode step is timed."""
    per_seq = -(-(prompt_len + new_tokens) // 16)
    instance = Instance(model, num_blocks=batch * per_seq, max_running=batch,
                        max_prefill_tokens=max(2048, prompt_len))
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    for b in range(batch):
        instance.add_request(_random_prompt(model, prompt_len, b), params)
    times = [r.elapsed_s for r in iter(instance.step, None) if r.kind is StepKind.DECODE]
    median = statistics.median(times)
    return Throughput(batch / median, median, len(times))


def measure_prefill(model: LlamaModel, prompt_len: int, repeats: int = 3) -> Throughput:
    """One prompt of prompt_len tokens as one prefill iteration, `repeats` times on fresh instances."""
    times = []
    for r in range(repeats):
        instance = Instance(model, num_blocks=-(-(prompt_len + 1) // 16), max_prefill_tokens=prompt_len)
        instance.add_request(_random_prompt(model, prompt_len, r), SamplingParams(max_tokens=1, ignore_eos=True))
        times.append(instance.step().elapsed_s)
    median = statistics.median(times)
    return Throughput(prompt_len / median, median, repeats)
