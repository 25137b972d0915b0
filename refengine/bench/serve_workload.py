"""The `bench serve` workload: a slice of the Azure LLM conversation trace, shrunk to fit a 135M model
on a small machine and spread over the N served models.

- Slice: the trace's first `ceil(load × duration)` requests (the same rows for every scheduler).
- Arrivals: their timestamps stretched or squeezed so the mean rate is `load` requests/s; the
  trace's own burstiness (inter-arrival CV ≈ 1.1) is kept.
- Lengths: prompt and output tokens × `length_scale` (at least 1), the prompt then clipped so prompt +
  output fit `CONTEXT`. At 1/8 the conversation trace's medians (1,020 in, 129 out) become 128 and 16.
- Models: the simulator's `azure` workload assignment, Zipf(1) popularity drawn by seed (8 models:
  the top one takes 37 %), rank k being the k-th served name: the default model, then -r1, -r2, ...
- Prompts: token ids of an English passage, cycled to length and shifted per request, so the server
  sees exactly the trace's prompt length (no text → token round trip).
"""
from __future__ import annotations

import math
import sys
from typing import Sequence

from models.catalogue import Catalogue
from refengine.sim.workload import TraceRequest, Workload, azure_llm

CONTEXT = 2048          # SmolLM2's training context (its config allows 8,192)
LENGTH_SCALE = 1 / 8
PASSAGE = (
    "The river leaves the mountains in a hurry and reaches the plain tired, spreading into slow loops "
    "that the farmers have named one by one. In spring the water climbs the banks and the villages move "
    "their sheep to the terraces; in summer the children walk across the shallows to the islands, where "
    "the herons stand still for hours and the old ferryman mends his nets. Travellers who ask for the "
    "bridge are told that there is none, and that the ferry leaves when it is full, which may be soon.")


def served_names(models: int) -> list[str]:
    """The names `serve --replicas models-1` serves: the default model and its replicas."""
    return Catalogue.default(replicas=models - 1).names


def scaled_lengths(prompt: int, output: int, scale: float, context: int = CONTEXT) -> tuple[int, int]:
    """(prompt, output) tokens × `scale`, at least 1 each, the prompt clipped so both fit `context`."""
    out = min(max(1, round(output * scale)), context - 1)
    return max(1, min(round(prompt * scale), context - out)), out


def serve_workload(models: Sequence[str], load: float, duration: float, seed: int = 0,
                   length_scale: float = LENGTH_SCALE, context: int = CONTEXT) -> Workload:
    """`load` requests/s for `duration` seconds of the conversation trace over `models` (see above)."""
    if load <= 0 or duration <= 0:
        raise ValueError(f"load and duration must be positive, got {load} req/s for {duration} s")
    trace = azure_llm(len(models), duration=math.inf, seed=seed, dataset="conv", max_context=sys.maxsize)
    rows = trace.requests[:math.ceil(load * duration)]
    t0, span = rows[0].arrival, rows[-1].arrival - rows[0].arrival
    stretch = (len(rows) - 1) / load / span if span > 0 else 0.0
    name = dict(zip(trace.models, models))
    requests = tuple(
        TraceRequest(r.request_id, name[r.model], (r.arrival - t0) * stretch,
                     *scaled_lengths(r.input_tokens, r.output_tokens, length_scale, context))
        for r in rows)
    return Workload(f"azure-conv-{len(models)}-models-{load:g}rps", tuple(models), requests, duration)


def prompt_ids(passage: Sequence[int], length: int, shift: int) -> list[int]:
    """`length` token ids of the passage, cycled, starting `shift` tokens in."""
    return [passage[(shift + k) % len(passage)] for k in range(length)]
