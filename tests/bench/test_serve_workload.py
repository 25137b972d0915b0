"""The `bench serve` workload: slice, time rescaling, length scaling, model assignment, prompts."""
from __future__ import annotations

import math
import sys
from collections import Counter

import pytest

from models.catalogue import DEFAULT_MODEL
from refengine.bench.serve_workload import prompt_ids, scaled_lengths, serve_workload, served_names
from refengine.sim.workload import TRACES, azure_llm

pytestmark = pytest.mark.skipif(not (TRACES / "AzureLLMInferenceTrace_conv.csv").is_file(),
                                reason=f"Azure conversation trace absent from {TRACES} (set REFENGINE_TRACES)")


def test_served_names_are_what_serve_replicas_serves():
    names = served_names(8)
    assert len(names) == 8 and names[0] == DEFAULT_MODEL and names[1] == f"{DEFAULT_MODEL}-r1"


@pytest.mark.parametrize("prompt, output, scale, expected", [
    (1020, 129, 1 / 8, (128, 16)),       # the trace's medians
    (3, 2, 1 / 8, (1, 1)),               # never below one token
    (14050, 1000, 1.0, (1048, 1000)),    # the prompt gives way so both fit 2,048
    (100, 5000, 1.0, (1, 2047)),
])
def test_lengths_scale_and_fit_the_context(prompt, output, scale, expected):
    assert scaled_lengths(prompt, output, scale) == expected


def test_slice_is_rescaled_to_the_offered_load_keeping_the_traces_shape():
    names = served_names(8)
    w = serve_workload(names, load=2.0, duration=30.0, seed=0)
    trace = azure_llm(8, duration=math.inf, seed=0, max_context=sys.maxsize).requests[:60]
    assert len(w.requests) == 60 and w.duration == 30.0
    assert w.requests[0].arrival == 0.0 and w.requests[-1].arrival == pytest.approx(59 / 2.0)
    stretch = w.requests[-1].arrival / (trace[-1].arrival - trace[0].arrival)
    for ours, theirs in zip(w.requests, trace):
        assert ours.arrival == pytest.approx((theirs.arrival - trace[0].arrival) * stretch)
        assert (ours.input_tokens, ours.output_tokens) == scaled_lengths(theirs.input_tokens, theirs.output_tokens, 1 / 8)
        assert ours.model == names[int(theirs.model[1:])]     # rank k -> the k-th served name


def test_assignment_is_seeded_zipf_and_loads_share_their_first_rows():
    names = served_names(8)
    a, b = serve_workload(names, 4.0, 100.0, seed=1), serve_workload(names, 4.0, 100.0, seed=1)
    assert a == b
    assert [r.model for r in a.requests] != [r.model for r in serve_workload(names, 4.0, 100.0, seed=2).requests]
    counts = Counter(r.model for r in a.requests)
    assert counts.most_common(1)[0][0] == names[0] and counts[names[0]] / 400 == pytest.approx(0.37, abs=0.08)
    low = serve_workload(names, 1.0, 100.0, seed=1)
    assert [r.model for r in low.requests] == [r.model for r in a.requests[:100]]


def test_bad_load_is_refused():
    with pytest.raises(ValueError, match="positive"):
        serve_workload(served_names(2), 0.0, 10.0)


def test_prompts_cycle_the_passage_from_a_shift():
    assert prompt_ids([1, 2, 3], 7, shift=2) == [3, 1, 2, 3, 1, 2, 3]
    assert prompt_ids([1, 2, 3], 1, shift=0) == [1]
