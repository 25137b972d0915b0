"""Stopping the server (SIGTERM, Ctrl-C) does not wait for long generations: open streams end at
once with finish reason "abort" and their [DONE], and a request that has no token yet gets 503."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from refengine.runtime.api import ShuttingDown
from refengine.server.app import SHUTDOWN_GRACE_S
from refengine.server.errors import to_api_error
from tests.server.conftest import CONTEXT, MODELS, LiveServer, tiny_runtime


@pytest.fixture
def own_server(tiny_home):
    """A server of its own: stopping it stops its runtime, which the shared one must outlive."""
    with LiveServer(tiny_runtime(tiny_home)) as server:
        yield server


def test_stopping_ends_open_streams_at_once(own_server):
    endless = {"model": MODELS[0], "prompt": "Once upon a time", "max_tokens": CONTEXT - 16,
               "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=own_server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=endless) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            stopping = threading.Thread(target=own_server.__exit__, args=(None, None, None))
            started = time.monotonic()
            stopping.start()
            rest = [line for line in lines if line]
        stopping.join(timeout=30)
    assert not stopping.is_alive()
    assert time.monotonic() - started < SHUTDOWN_GRACE_S       # the grace never had to cut a stream
    assert rest[-1] == "data: [DONE]" and '"finish_reason":"abort"' in rest[-2]


def test_a_request_during_shutdown_is_503():
    error = to_api_error(ShuttingDown())
    assert (error.status, error.type, error.code) == (503, "server_error", "shutting_down")
