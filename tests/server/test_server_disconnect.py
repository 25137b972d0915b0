"""A client that goes away: the server closes the runtime's iterators, the runtime aborts the
sequences and frees their KV blocks, and the server keeps serving."""
from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import MODELS, wait_until

MODEL = MODELS[0]
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}


def cancelled_after(runtime, before: int, n: int) -> None:
    """The server closed n iterators early, and the runtime has nothing left of them."""
    wait_until(lambda: runtime.cancelled == before + n)
    wait_until(runtime.idle)


@pytest.mark.parametrize("n", [1, 3])
def test_disconnect_mid_stream_cancels(live_server, runtime, n):
    before = runtime.cancelled
    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=LONG | {"stream": True, "n": n}) as response:
            lines = response.iter_lines()
            assert response.status_code == 200 and next(lines).startswith("data: ")
    cancelled_after(runtime, before, n)


def test_openai_client_closing_a_stream_cancels(client, runtime):
    before = runtime.cancelled
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=400, stream=True, extra_body={"ignore_eos": True})
    assert next(iter(stream)).choices[0].delta.role == "assistant"
    stream.close()
    cancelled_after(runtime, before, 1)


@pytest.mark.parametrize("stream", [False, True])
def test_client_giving_up_before_the_first_token_cancels(live_server, runtime, stream):
    """A non-streaming request, or a stream still waiting for its first token (a cold start), has no
    response being sent yet: the server must notice the disconnect by itself."""
    runtime.first_token_delay_s = 5.0
    before = runtime.cancelled
    with httpx.Client(base_url=live_server.url, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=LONG | {"stream": stream})
    cancelled_after(runtime, before, 1)


def test_disconnects_are_counted_as_499(live_server, http):
    with httpx.Client(base_url=live_server.url, timeout=30) as other:
        with other.stream("POST", "/v1/completions", json=LONG | {"stream": True}) as response:
            next(response.iter_lines())
    wait_until(lambda: 'status="499"' in http.get("/metrics").text)
