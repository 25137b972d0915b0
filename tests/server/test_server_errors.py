"""Every bad input gets OpenAI's error JSON with the right status, and the server keeps serving."""
from __future__ import annotations

import json

import openai
import pytest

from refengine.runtime.instances import LiveInstance
from tests.server.conftest import CONTEXT, MODELS, wait_until

MODEL = MODELS[0]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


def assert_error(response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and "\n" not in error["message"] and error["message"]
    assert error["param"] == param and error["code"] == code, error
    return error


@pytest.fixture(autouse=True)
def still_serving(http):
    """After each bad request, a good one still works."""
    yield
    ok = http.post(COMPLETIONS, json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


BAD_BODIES = [  # (path, body, param, code)
    (COMPLETIONS, {"prompt": "x"}, "model", None),
    (COMPLETIONS, {"model": MODEL}, "prompt", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "max_tokens": -5}, "max_tokens", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "max_tokens": 2.5}, "max_tokens", None),
    (CHAT, {"model": MODEL, "messages": USER, "max_completion_tokens": 0}, "max_completion_tokens", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "temperature": -0.1}, "temperature", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "temperature": 2.5}, "temperature", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "top_p": 0}, "top_p", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "top_p": 1.5}, "top_p", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "top_k": -1}, "top_k", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "frequency_penalty": 2.5}, "frequency_penalty", None),
    (CHAT, {"model": MODEL, "messages": USER, "presence_penalty": -2.1}, "presence_penalty", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "n": 0}, "n", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "n": 1000}, "n", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "seed": "abc"}, "seed", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "stop": ""}, "stop", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "stop": ["ok", ""]}, "stop", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "stop": 5}, "stop", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "echo": True}, "echo", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "slo": {"ttft_s": 0}}, "slo", None),
    (COMPLETIONS, {"model": MODEL, "prompt": 5}, "prompt", None),
    (COMPLETIONS, {"model": MODEL, "prompt": [1, -2]}, "prompt", None),
    (COMPLETIONS, {"model": MODEL, "prompt": ""}, None, None),
    (COMPLETIONS, {"model": MODEL, "prompt": []}, None, None),
    (COMPLETIONS, {"model": MODEL, "prompt": [10**7]}, "prompt", None),
    (COMPLETIONS, {"model": MODEL, "prompt": [[1, 2], [3, 10**7]]}, "prompt", None),
    (COMPLETIONS, {"model": MODEL, "prompt": [5] * (CONTEXT + 10)}, None, "context_length_exceeded"),
    (COMPLETIONS, {"model": MODEL, "prompt": [5] * 500, "max_tokens": 100}, None, "context_length_exceeded"),
    (CHAT, {"model": MODEL, "messages": []}, "messages", None),
    (CHAT, {"model": MODEL, "messages": "Hi"}, "messages", None),
    (CHAT, {"model": MODEL, "messages": [{"content": "Hi"}]}, "messages", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x " * 600}]}, None, "context_length_exceeded"),
    (CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "Hi"}]}, "messages", None),
    (CHAT, {"model": MODEL, "messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", None),
    (CHAT, {"model": MODEL, "messages": USER, "functions": [{"name": "f"}]}, "functions", None),
    (CHAT, {"model": MODEL, "messages": USER, "response_format": {"type": "json_object"}}, "response_format", None),
    (CHAT, {"model": MODEL, "messages": USER, "top_logprobs": 2}, "top_logprobs", None),
    (CHAT, {"model": MODEL, "messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "logprobs": -1}, "logprobs", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "suffix": "end"}, "suffix", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "best_of": 3}, "best_of", None),
    (CHAT, {"model": MODEL, "messages": USER, "tool_choice": "required"}, "tool_choice", None),
    (CHAT, {"model": MODEL, "messages": USER, "modalities": ["text", "audio"]}, "modalities", None),
    (CHAT, {"model": MODEL, "messages": USER, "audio": {"voice": "alloy", "format": "wav"}}, "audio", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "logit_bias": {"the": 5}}, "logit_bias", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias", None),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "logit_bias": {str(10**7): 1}}, "logit_bias", None),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path,body,param,code", BAD_BODIES,
                         ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else None)
def test_bad_body_is_400(http, path, body, param, code, stream):
    assert_error(http.post(path, json=body | {"stream": stream}), 400, param, code)


@pytest.mark.parametrize("path,body", [(COMPLETIONS, {"prompt": "x"}), (CHAT, {"messages": USER})])
@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404(http, path, body, stream):
    error = assert_error(http.post(path, json=body | {"model": "gpt-9", "stream": stream}), 404, "model",
                         "model_not_found")
    assert "gpt-9" in error["message"] and MODEL in error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b'{"model": "tiny-a", "prompt": "x",}', b"", b"[1, 2]", b'"text"'])
def test_malformed_json_is_400(http, raw):
    response = http.post(COMPLETIONS, content=raw, headers={"Content-Type": "application/json"})
    assert_error(response, 400)


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_body_not_sent_as_json_says_how_to_send_it(http, content_type):
    """curl -d sends a form by default: the message names the header to set."""
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2}).encode()
    error = assert_error(http.post(COMPLETIONS, content=body, headers=headers), 400)
    assert "Content-Type: application/json" in error["message"] and (content_type or "no Content-Type") in error["message"]


@pytest.mark.parametrize("header,value", [("X-SLO-TTFT", "abc"), ("X-SLO-TPOT", "-1"), ("X-SLO-TTFT", "0")])
def test_bad_slo_header_is_400(http, header, value):
    response = http.post(COMPLETIONS, json={"model": MODEL, "prompt": "x"}, headers={header: value})
    assert_error(response, 400, header)


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing"), 404, code="not_found")
    assert_error(http.get(COMPLETIONS), 405)


@pytest.mark.parametrize("stream", [False, True])
def test_overloaded_is_429_with_retry_after(http, client, runtime, stream):
    runtime.overloaded = "no instance can meet the TTFT SLO"
    response = http.post(COMPLETIONS, json={"model": MODEL, "prompt": "x", "stream": stream})
    error = assert_error(response, 429, code="overloaded")
    assert response.headers["Retry-After"] == "3" and "TTFT" in error["message"]
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=USER)
    runtime.heal()


@pytest.mark.parametrize("stream", [False, True])
def test_a_device_failure_is_500_and_the_model_starts_again(http, runtime, monkeypatch, stream):
    """A step that raises on the device ends its request with a 500; `still_serving` then sends the
    model's next request, which a new instance serves."""
    failures = runtime.status().failures
    original = LiveInstance.step

    def failing_step(self, kind):
        monkeypatch.setattr(LiveInstance, "step", original)     # once
        raise RuntimeError("injected device fault")

    monkeypatch.setattr(LiveInstance, "step", failing_step)
    response = http.post(COMPLETIONS, json={"model": MODEL, "prompt": "x", "stream": stream})
    error = assert_error(response, 500, code="device_failure")
    assert error["type"] == "server_error" and "injected device fault" in error["message"]
    assert runtime.status().failures == failures + 1
    assert 'refengine_instance_failures_total' in http.get("/metrics").text


def test_error_after_stream_began_is_an_event_then_done(http, client, runtime):
    runtime.fail_after_tokens = 3
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 20, "ignore_eos": True, "stream": True}
    with http.stream("POST", COMPLETIONS, json=body) as response:
        assert response.status_code == 200
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "injected" in error["message"]
    assert sum("text_completion" in e for e in events) == 3
    with pytest.raises(openai.APIError, match="injected"):
        list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=20, stream=True))
    wait_until(runtime.idle)


def test_openai_client_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.completions.create(model=MODEL, prompt=[5] * (CONTEXT + 1))
    assert excinfo.value.code == "context_length_exceeded"
