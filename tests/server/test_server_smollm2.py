"""The real SmolLM2-135M-Instruct behind the server, on the fast CPU backend: chat and completion,
streamed and not, through the official client, each equal to the engine's own greedy output.

The first request is a cold start (the model loads on demand): its usage reports the cold-start
grace; later ones are warm (grace 0).
"""
from __future__ import annotations

import json

import openai
import pytest

from models.catalogue import DEFAULT_MODEL, Catalogue
from refengine.engine.sequence import SamplingParams
from refengine.generate import PromptSpec, generate
from refengine.runtime.devices import DeviceSpec
from refengine.runtime.live import LiveRuntime, RuntimeOptions
from refengine.runtime.profile import QUICK_GRID
from tests.server.conftest import RELAXED, LiveServer
from tests.server.probe_runtime import ProbeRuntime

QUESTION = "What is the capital of France?"
PROMPT = "The three primary colours are"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def served(model_home):
    """keep-alive long enough that only the first request is a cold start."""
    runtime = ProbeRuntime(LiveRuntime(RuntimeOptions(
        catalogue=Catalogue.default(), devices=[DeviceSpec("cpu:0", 4 << 30)], backend="cpu",
        home=model_home, profile_grid=QUICK_GRID, slo=RELAXED, keep_alive_s=600.0)))
    with LiveServer(runtime) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        first = client.completions.create(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
        yield client, runtime, first


@pytest.fixture(scope="module")
def expected(smollm2):
    specs = [PromptSpec(QUESTION, chat=True), PromptSpec(PROMPT)]
    chat, completion = generate(smollm2, specs, SamplingParams(max_tokens=MAX_TOKENS))
    return {"chat": chat, "completion": completion}


def test_the_cold_request_reports_its_grace_and_warm_ones_none(served):
    client, _, first = served
    assert first.usage.model_extra["cold_start_grace_s"] > 0
    warm = client.completions.create(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    assert warm.usage.model_extra["cold_start_grace_s"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_engine_greedy(served, expected, stream):
    client, runtime, _ = served
    kwargs = dict(model=DEFAULT_MODEL, messages=[{"role": "user", "content": QUESTION}],
                  max_tokens=MAX_TOKENS, temperature=0)
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        response = client.chat.completions.create(**kwargs)
        text, usage = response.choices[0].message.content, response.usage
    assert text == expected["chat"].text and "Paris" in text
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected["chat"].prompt_tokens,
                                                              expected["chat"].output_tokens)
    assert runtime.idle()


@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_engine_greedy(served, expected, stream):
    client, _, _ = served
    kwargs = dict(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    if stream:
        text = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    else:
        text = client.completions.create(**kwargs).choices[0].text
    assert text == expected["completion"].text


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_add_up_to_the_text(served, expected, stream):
    """Each token's bytes, in order, are the answer's bytes, then the end-of-sequence token that
    ended it (counted in usage like every output token, though it adds no text); greedy tokens are
    their own top choice."""
    client, runtime, _ = served
    kwargs = dict(model=DEFAULT_MODEL, messages=[{"role": "user", "content": QUESTION}],
                  max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=5)
    if stream:
        chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        text, entries = choice.message.content, choice.logprobs.content
    assert text == expected["chat"].text and len(entries) == MAX_TOKENS
    assert entries[-1].token == "<|im_end|>"
    assert b"".join(bytes(e.bytes) for e in entries[:-1]) == text.encode()
    for e in entries:
        assert len(e.top_logprobs) == 5 and (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, e.logprob)
    assert runtime.idle()


def test_completion_logprobs_match_the_golden_logits(served, golden_dir, prepared_model):
    """The alternatives after the golden prompt are the golden top logits, in order, and their
    log-probabilities differ as those logits do (a log-softmax only shifts them)."""
    from refengine.engine.tokenizer import Tokenizer
    client, _, _ = served
    case = next(c for c in json.loads((golden_dir / "greedy.json").read_text())["cases"] if c["kind"] == "raw")
    choice = client.completions.create(model=DEFAULT_MODEL, prompt=case["prompt_text"], max_tokens=2,
                                       temperature=0, logprobs=5).choices[0]
    tokenizer = Tokenizer(prepared_model)
    golden = case["top10_step0"]
    top = choice.logprobs.top_logprobs[0]
    assert list(top) == [tokenizer.token_bytes(i).decode() for i in golden["ids"][:5]]
    shifts = [lp - choice.logprobs.token_logprobs[0] for lp in top.values()]
    assert shifts == pytest.approx([v - golden["values"][0] for v in golden["values"][:5]], abs=2e-3)
    assert choice.logprobs.text_offset == [0, len(choice.logprobs.tokens[0])]
