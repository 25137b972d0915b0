"""The OpenAI surface over a real uvicorn, driven by the official `openai` client."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from refengine.engine.sequence import SamplingParams
from refengine.generate import PromptSpec, generate
from tests.server.conftest import CONTEXT, MODELS, TINY_B_SAMPLING, WEIGHTS, wait_until

MODEL = MODELS[0]
QUESTION = "What is the capital of France?"


@pytest.fixture(autouse=True)
def no_cancellations_or_leaks(runtime):
    """Requests that run to the end are never cancelled (closing a finished iterator would read as
    one), and leave no sequence or KV block behind."""
    before = runtime.cancelled
    yield
    assert runtime.cancelled == before
    wait_until(runtime.idle)


def engine_greedy(loaded, text: str, chat: bool, max_tokens: int):
    """The engine's own answer: `refengine.generate` on the same model, outside any server."""
    return generate(loaded, [PromptSpec(text, chat=chat)], SamplingParams(max_tokens=max_tokens))[0]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_equals_engine(client, tiny_loaded, stream):
    expected = engine_greedy(tiny_loaded, QUESTION, chat=True, max_tokens=20)
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=20, temperature=0)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        assert finish == [expected.finish_reason]
    else:
        response = client.chat.completions.create(**kwargs)
        text, message = response.choices[0].message.content, response.choices[0].message
        assert message.role == "assistant" and response.object == "chat.completion"
        assert response.choices[0].finish_reason == expected.finish_reason
        assert response.usage.prompt_tokens == expected.prompt_tokens
        assert response.usage.completion_tokens == expected.output_tokens
        assert response.usage.total_tokens == expected.prompt_tokens + expected.output_tokens
    assert text == expected.text


@pytest.mark.parametrize("stream", [False, True])
def test_completion_greedy_equals_engine(client, tiny_loaded, stream):
    expected = engine_greedy(tiny_loaded, "Once upon a time", chat=False, max_tokens=12)
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    if stream:
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        assert all(c.object == "text_completion" for c in chunks)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.output_tokens
        assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens
        assert chunks[-2].choices[0].finish_reason == expected.finish_reason
    else:
        response = client.completions.create(**kwargs)
        text = response.choices[0].text
        assert response.choices[0].finish_reason == expected.finish_reason == "length"
        assert response.usage.completion_tokens == 12
    assert text == expected.text


def test_token_id_prompt_equals_text_prompt(client, tiny_loaded):
    ids = tiny_loaded.tokenizer.encode("Once upon a time")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_multi_part_content_is_flattened(client):
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    joined = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}],
                                            max_tokens=6, temperature=0)
    plain = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital\nof France?"}])
    assert joined.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_with_seed_differ_and_reproduce(client, runtime, stream):
    kwargs = dict(model=MODEL, prompt="Hello", max_tokens=10, temperature=1.0, n=3, seed=7)

    def texts():
        if not stream:
            return [c.text for c in sorted(client.completions.create(**kwargs).choices, key=lambda c: c.index)]
        out = ["", "", ""]
        for chunk in client.completions.create(stream=True, **kwargs):
            for c in chunk.choices:
                out[c.index] += c.text
        return out

    first = texts()
    seen = runtime.requests[-3:]
    assert sorted(r.params.seed for r in seen) == [7, 8, 9]
    assert len(set(first)) == 3
    assert texts() == first


def test_omitted_sampling_fields_take_the_models_defaults(client, runtime):
    """A field the request leaves out takes the model's default (tiny-b's from the catalogue,
    tiny-a's OpenAI's); a field it sets wins, 0 included."""
    def params(**kwargs):
        client.completions.create(prompt="Hello", max_tokens=2, **kwargs)
        return runtime.requests[-1].params

    omitted = params(model=MODELS[1])
    assert (omitted.temperature, omitted.top_p) == (TINY_B_SAMPLING.temperature, TINY_B_SAMPLING.top_p)
    chosen = params(model=MODELS[1], temperature=0, top_p=1.0)
    assert (chosen.temperature, chosen.top_p) == (0.0, 1.0)
    openai_defaults = params(model=MODELS[0])
    assert (openai_defaults.temperature, openai_defaults.top_p) == (1.0, 1.0)


def test_penalties_reach_the_engine(client, runtime):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                   temperature=0, frequency_penalty=0.5, presence_penalty=-0.25)
    params = runtime.requests[-1].params
    assert (params.frequency_penalty, params.presence_penalty) == (0.5, -0.25)


def test_n_usage_counts_the_prompt_once(client):
    one = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, temperature=0)
    three = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, temperature=0, n=3)
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert [c.index for c in three.choices] == [0, 1, 2]


def test_stop_string_cuts_the_text(client, tiny_loaded):
    full = engine_greedy(tiny_loaded, "Once upon a time", chat=False, max_tokens=40).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), f"need a visible stop string in {full!r}"
    for stream in (False, True):
        kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0, stop=[stop, "\u2603"])
        if stream:
            chunks = list(client.completions.create(stream=True, **kwargs))
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            choice = client.completions.create(**kwargs).choices[0]
            text, reason = choice.text, choice.finish_reason
        assert text == full[:full.index(stop)] and reason == "stop"


def test_batch_of_prompts(client):
    response = client.completions.create(model=MODEL, prompt=["Hello", "Once upon a time"], max_tokens=4,
                                         temperature=0, n=2)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.choices[0].text == response.choices[1].text != response.choices[2].text


def test_chat_without_max_tokens_may_use_the_rest_of_the_context(http, runtime):
    """OpenAI's chat default: a long conversation is not refused for a max_tokens it never gave."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x " * 200}], "ignore_eos": True}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == runtime.context_length(MODEL) == CONTEXT
    assert response.json()["choices"][0]["finish_reason"] == "length"


def test_slo_override_from_body_and_headers(client, http, runtime):
    http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "slo": {"ttft_s": 3}},
              headers={"X-SLO-TTFT": "9", "X-SLO-TPOT": "0.5"}).raise_for_status()
    assert runtime.requests[-1].slo.ttft_s == 3 and runtime.requests[-1].slo.tpot_s == 0.5
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert runtime.requests[-1].slo is None


def test_models_lists_the_catalogue_loaded_or_not(client, http, runtime):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    models = client.models.list()
    assert [m.id for m in models.data] == MODELS
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list" and all(m["object"] == "model" for m in raw["data"])
    assert [m["loaded"] for m in raw["data"]] == [name in runtime.loaded_models() for name in MODELS]
    assert raw["data"][0]["loaded"] and raw["data"][0]["root"] == WEIGHTS
    assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert http.get("/v1/models/nope").json()["error"]["code"] == "model_not_found"


def test_health(http, runtime):
    body = http.get("/health").json()
    assert body == {"status": "ok", "models": len(MODELS), "loaded": sorted(runtime.loaded_models())}


def test_metrics_parse(client, http):
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
    http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    text = http.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("refengine_requests_total", (("endpoint", "/v1/completions"), ("model", MODEL),
                                                 ("status", "200")))] >= 1
    assert samples[("refengine_requests_total", (("endpoint", "/v1/completions"), ("model", "unknown"),
                                                 ("status", "404")))] >= 1
    assert samples[("refengine_time_to_first_token_seconds_count", (("model", MODEL),))] >= 1
    assert samples[("refengine_time_per_output_token_seconds_count", (("model", MODEL),))] >= 1
    assert sum(v for (name, labels), v in samples.items() if name == "refengine_slo_generations_total") >= 1
    assert samples[("refengine_instances_loaded", (("device", "cpu:0"),))] >= 1
    for name in ("refengine_device_memory_budget_bytes", "refengine_device_memory_optimistic_bytes",
                 "refengine_device_memory_actual_bytes", "refengine_instance_kv_blocks_used",
                 "refengine_cold_starts", "refengine_preemptions", "refengine_drops"):
        assert name in families, name
    assert 0 < samples[("refengine_host_cache_used_bytes", ())] <= samples[("refengine_host_cache_budget_bytes", ())]


def test_completion_logprobs_streamed_equal_whole_for_every_choice(client):
    kwargs = dict(model=MODEL, prompt=["Hello", "Once upon a time"], max_tokens=5, temperature=0, logprobs=2, n=2)
    whole = {c.index: c.logprobs for c in client.completions.create(**kwargs).choices}
    streamed = {i: {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} for i in whole}
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            for key, values in (c.logprobs.model_dump() if c.logprobs else {}).items():
                streamed[c.index][key] += values
    for index, logprobs in whole.items():
        got, want = streamed[index], logprobs.model_dump()
        assert (got["tokens"], got["text_offset"]) == (want["tokens"], want["text_offset"])
        # the two requests may batch their sequences into steps differently, and BLAS sums a
        # float32 product of another shape in another order: the last bits differ
        assert got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-5)
        assert all(g == pytest.approx(w, abs=1e-5) for g, w in zip(got["top_logprobs"], want["top_logprobs"]))
        assert len(logprobs.tokens) == 5 and all(len(top) <= 2 for top in logprobs.top_logprobs)
        lengths = [len(t) for t in logprobs.tokens]
        assert logprobs.text_offset == [sum(lengths[:k]) for k in range(5)]   # each choice counts its own


def test_logit_bias_reaches_the_engine_and_steers_it(client, runtime):
    response = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                         logit_bias={"42": 100}, logprobs=0)
    assert runtime.requests[-1].params.logit_bias == ((42, 100.0),)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == 4 and len(set(logprobs.tokens)) == 1 and logprobs.top_logprobs == [{}] * 4
