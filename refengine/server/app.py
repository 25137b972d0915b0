"""The FastAPI app: OpenAI's completion endpoints, /v1/models, /health and /metrics over a `Runtime`.

Chat and text completions are one path: the request model renders its prompts to token ids, each
prompt gets n choices, a `Generation` runs them through the runtime, and its deltas become either a
stream of server-sent events or one JSON response. The event loop only tokenizes (in a thread) and
moves events; the model runs in the runtime's device threads.
"""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from contextlib import asynccontextmanager
from functools import partial
from typing import AsyncIterator, Callable, Protocol

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from refengine.runtime.api import Runtime
from refengine.server.errors import CLIENT_CLOSED, APIError, install_error_handlers
from refengine.server.generation import Choice, Delta, Generation
from refengine.server.logprobs import LogprobsWriter, ScoredToken
from refengine.server.metrics import Metrics, RequestCounter
from refengine.server.responses import Envelope
from refengine.server.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest
from refengine.server.streaming import ClientDisconnected, event_stream, until_disconnected

CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"
SLO_HEADERS = ("X-SLO-TTFT", "X-SLO-TPOT")
SHUTDOWN_GRACE_S = 5


class Startable(Protocol):
    async def start(self) -> None: ...
    def shut_down(self) -> None: ...
    async def stop(self) -> None: ...


class GracefulServer(uvicorn.Server):
    """uvicorn that, told to stop (SIGTERM, Ctrl-C), first has the runtime end its requests, so that
    open streams close with a last chunk instead of holding the exit: one chat completion without
    max_tokens may otherwise run to the end of the context, minutes on a CPU. Whatever is still open
    after `SHUTDOWN_GRACE_S` is cut."""

    def __init__(self, app: FastAPI, runtime: Startable, **config):
        super().__init__(uvicorn.Config(app, timeout_graceful_shutdown=SHUTDOWN_GRACE_S, **config))
        self.runtime = runtime

    async def shutdown(self, sockets=None) -> None:
        self.runtime.shut_down()
        await super().shutdown(sockets=sockets)


def runtime_lifespan(runtime: Startable) -> Callable:
    """A lifespan that starts the runtime with the server and stops it (draining its devices) after."""
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()
    return lifespan


def create_app(runtime: Runtime, lifespan: Callable | None = None) -> FastAPI:
    app = FastAPI(title="refengine", summary="OpenAI-compatible serverless inference of many small LLMs",
                  lifespan=lifespan)
    metrics = Metrics(runtime)
    install_error_handlers(app)
    app.add_middleware(RequestCounter, metrics=metrics, paths=frozenset({CHAT_PATH, COMPLETIONS_PATH}))
    started = int(time.time())

    @app.post(CHAT_PATH)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await complete(runtime, metrics, body, request)

    @app.post(COMPLETIONS_PATH)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await complete(runtime, metrics, body, request)

    def model_card(name: str, loaded: set[str]) -> dict:
        """OpenAI's model object plus `root` (the weights behind the name, as vLLM reports them) and
        `loaded` (whether an instance holds it on some device now; unloaded ones are servable too)."""
        return {"id": name, "object": "model", "created": started, "owned_by": "refengine",
                "root": runtime.catalogue[name].weights, "loaded": name in loaded}

    @app.get("/v1/models")
    async def list_models() -> dict:
        loaded = runtime.loaded_models()
        return {"object": "list", "data": [model_card(name, loaded) for name in runtime.catalogue.names]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> dict:
        return model_card(model, runtime.loaded_models())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": len(runtime.catalogue.names), "loaded": sorted(runtime.loaded_models())}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


async def complete(runtime: Runtime, metrics: Metrics, body: GenerationRequest, request: Request) -> Response:
    """Both completion endpoints: prompts -> choices -> generation -> SSE stream or one JSON body."""
    request.state.model = body.model if body.model in runtime.catalogue else "unknown"
    tokenizer = runtime.tokenizer(body.model)
    body.check_token_ids(tokenizer.vocab_size)
    prompts = await asyncio.to_thread(body.prompt_ids, tokenizer)
    context = runtime.context_length(body.model)
    defaults = runtime.catalogue[body.model].default_sampling
    choices = [Choice(p * body.num_choices + s, p, s, ids, body.sampling_params(s, context - len(ids), defaults))
               for p, ids in enumerate(prompts) for s in range(body.num_choices)]
    slo = body.slo_override(*(slo_header(request, name) for name in SLO_HEADERS))
    generation = Generation(runtime, body.model, choices, slo, partial(metrics.observe, body.model, slo))
    envelope = Envelope(body.shape, body.model)
    streaming = False
    try:
        # Waiting for the first delta before answering lets errors the runtime raises before any token
        # (bad request, overloaded) keep their HTTP status, streamed or not.
        first = await until_disconnected(request, generation.next())
        writer = LogprobsWriter(tokenizer, body.shape.chat)
        if body.stream:
            streaming = True
            return event_stream(generation, first, envelope, writer, body.include_usage, request.state)
        texts, scored = await until_disconnected(request, collect(generation, first))
        return JSONResponse(envelope.response(
            [body.shape.choice(c.index, texts[c.index], generation.finished[c.index].reason,
                               writer.render(c.index, scored[c.index]) if body.requested_logprobs is not None else None)
             for c in choices],
            generation.usage()))
    except ClientDisconnected:
        request.state.status = CLIENT_CLOSED
        return Response(status_code=CLIENT_CLOSED)
    finally:
        if not streaming:
            await generation.aclose()


async def collect(generation: Generation, first: Delta) -> tuple[dict[int, str], dict[int, list[ScoredToken]]]:
    """The whole text of every choice, and its scored tokens (a non-streaming response)."""
    texts: dict[int, str] = defaultdict(str)
    scored: dict[int, list[ScoredToken]] = defaultdict(list)
    delta: Delta | None = first
    while delta is not None:
        texts[delta.index] += delta.text
        if delta.scored is not None:
            scored[delta.index].append(delta.scored)
        delta = await generation.next()
    return texts, scored


def slo_header(request: Request, name: str) -> float | None:
    """An SLO override header in seconds (positive), or None when absent."""
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise APIError(400, f"{name} must be a positive number of seconds, got {raw!r}", param=name)
    return value
