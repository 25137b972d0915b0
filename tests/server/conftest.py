"""A real uvicorn on loopback serving the app over a FakeRuntime (real Instances on a tiny model).

The model has TINY's dimensions with SmolLM2's vocabulary and tokenizer, so text goes through the
real tokenizer, chat template and streaming detokenizer while each engine step takes about a
millisecond.
"""
from __future__ import annotations

import dataclasses
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from kernels import get_kernels
from models.catalogue import DEFAULT_MODEL, Catalogue, ModelSpec
from models.llama import LlamaModel, LlamaWeights
from models.random_weights import TINY, random_tensors
from refengine.engine.loader import LoadedModel
from refengine.engine.tokenizer import Tokenizer
from refengine.server.app import create_app, runtime_lifespan
from tests.server.fake_runtime import FakeRuntime

MODELS = ["tiny-a", "tiny-b"]
CONTEXT = 512  # TINY's max_position_embeddings


def wait_until(condition, timeout_s: float = 10.0) -> None:
    """For effects the runtime applies between steps (an abort frees its blocks before the next step)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        time.sleep(0.01)


class LiveServer:
    """uvicorn in a background thread on a port the OS picked."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


@pytest.fixture(scope="session")
def tiny_loaded(prepared_model) -> LoadedModel:
    tokenizer = Tokenizer(prepared_model)
    config = dataclasses.replace(TINY, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id)
    kernels = get_kernels("reference")
    model = LlamaModel(config, LlamaWeights.from_hf(random_tensors(config, seed=1), config, kernels), kernels)
    return LoadedModel(model, tokenizer, prepared_model, load_s=0.0)


@pytest.fixture(scope="session")
def fake_runtime(tiny_loaded) -> FakeRuntime:
    return FakeRuntime(Catalogue([ModelSpec(name, DEFAULT_MODEL) for name in MODELS]), tiny_loaded)


@pytest.fixture(scope="session")
def live_server(fake_runtime):
    with LiveServer(create_app(fake_runtime, lifespan=runtime_lifespan(fake_runtime))) as server:
        yield server


@pytest.fixture(autouse=True)
def healthy_runtime(request):
    """Faults injected by one test never leak into the next."""
    yield
    if "fake_runtime" in request.fixturenames:
        runtime = request.getfixturevalue("fake_runtime")
        runtime.overloaded, runtime.fail_after_tokens, runtime.step_delay_s = None, None, 0.0


@pytest.fixture
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def http(live_server):
    with httpx.Client(base_url=live_server.url, timeout=30) as c:
        yield c
