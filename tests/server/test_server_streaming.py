"""SSE framing and the stream's cleanup, at the ASGI level (no network)."""
from __future__ import annotations

import asyncio
import json

from refengine.server.streaming import DONE, EventStreamResponse, sse


def test_sse_framing():
    event = sse({"text": "héllo\n", "n": 1})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    assert json.loads(event[len(b"data: "):]) == {"text": "héllo\n", "n": 1}
    assert DONE == b"data: [DONE]\n\n"


def test_body_is_closed_when_the_client_leaves_during_a_send():
    """A client that disconnects while a chunk is being written (transport paused) leaves Starlette's
    stream task cancelled inside `send`, with the body suspended at a yield: the response must close
    it there and then, not whenever the garbage collector gets to it."""
    async def scenario() -> bool:
        closed = asyncio.Event()
        writing = asyncio.Event()

        async def body():
            try:
                yield b"data: 1\n\n"
                yield b"data: 2\n\n"
            finally:
                closed.set()

        async def send(message):
            if message["type"] == "http.response.body":
                writing.set()
                await asyncio.Event().wait()   # the socket never drains

        async def receive():
            await writing.wait()
            return {"type": "http.disconnect"}

        response = EventStreamResponse(body())
        await asyncio.wait_for(response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send), 5)
        return closed.is_set()

    assert asyncio.run(scenario())
