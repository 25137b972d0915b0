"""Server-sent events for streamed completions, and noticing a client that went away.

A stream is `data: {chunk}\\n\\n` events, then `data: [DONE]\\n\\n`. An error after the 200 header
has gone out can only travel in-band: it becomes one `data: {"error": ...}` event before [DONE]
(OpenAI's SDKs raise it as an APIError). Whatever way the stream ends (done, error, client gone,
server shutting down) the generation is closed, so the runtime aborts what is still running.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator, Awaitable, TypeVar

import anyio
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from refengine.server.errors import CLIENT_CLOSED, to_api_error
from refengine.server.generation import Delta, Generation
from refengine.server.logprobs import LogprobsWriter
from refengine.server.responses import Envelope

DONE = b"data: [DONE]\n\n"
log = logging.getLogger(__name__)
T = TypeVar("T")


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class ClientDisconnected(Exception):
    pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work` unless the client disconnects first; then cancel it and raise ClientDisconnected.

    Starlette watches the connection only while a StreamingResponse is being sent. Before that (a
    non-streaming request, or a stream still waiting for its first token through a cold start) this
    is what notices a client that gave up, so its request stops using the device.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientDisconnected()


async def _disconnect(receive: Receive) -> None:
    """Returns when the server reports the connection closed (the body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator. Starlette leaves an iterator that
    was interrupted while a chunk was being sent to the garbage collector; this one is closed at once
    (shielded, as the task may be cancelled), which runs the body's cleanup."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes]):
        super().__init__(body, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._body.aclose()


def event_stream(generation: Generation, first: Delta, envelope: Envelope, writer: LogprobsWriter,
                 include_usage: bool, state: State) -> EventStreamResponse:
    """The response that streams `generation` from its first delta on; it owns and closes it.
    A token that asked for log-probabilities gets a chunk even while its text is held back."""
    return EventStreamResponse(_events(generation, first, envelope, writer, include_usage, state))


async def _events(generation: Generation, first: Delta, envelope: Envelope, writer: LogprobsWriter,
                  include_usage: bool, state: State) -> AsyncIterator[bytes]:
    started: set[int] = set()   # choices whose first chunk (naming the role) has gone out
    completed = False
    try:
        try:
            delta: Delta | None = first
            while delta is not None:
                if delta.text or delta.finish_reason or delta.scored or delta.index not in started:
                    logprobs = None if delta.scored is None else writer.render(delta.index, [delta.scored])
                    choice = envelope.shape.delta(delta.index, delta.text, delta.finish_reason,
                                                  first=delta.index not in started, logprobs=logprobs)
                    started.add(delta.index)
                    yield sse(envelope.chunk([choice]))
                delta = await generation.next()
            if include_usage:
                yield sse(envelope.chunk([], usage=generation.usage()))
        except Exception as e:
            error = to_api_error(e)
            if error.status >= 500:
                log.error("stream failed after its first chunk", exc_info=e)
            state.status = error.status
            yield sse(error.body())
        yield DONE
        completed = True
    finally:
        if not completed:
            state.status = CLIENT_CLOSED
        with anyio.CancelScope(shield=True):
            await generation.aclose()
