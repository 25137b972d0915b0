"""A real uvicorn on loopback serving the app over the real `LiveRuntime`.

The runtime serves two names backed by one tiny random model written into a private model cache:
TINY's dimensions with SmolLM2's vocabulary and tokenizer, so text goes through the real tokenizer,
chat template and streaming detokenizer, and the scheduler, device worker and engine run for real,
while a step takes milliseconds.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from safetensors.numpy import save_file

from kernels import get_kernels
from models.catalogue import Catalogue, ModelSpec, SamplingDefaults
from models.random_weights import TINY, random_tensors
from refengine.engine.loader import LoadedModel, load_model
from refengine.engine.tokenizer import Tokenizer
from refengine.runtime.devices import DeviceSpec
from refengine.runtime.live import LiveRuntime, RuntimeOptions
from refengine.runtime.profile import QUICK_GRID
from refengine.server.app import GracefulServer, create_app, runtime_lifespan
from refengine.store.cache import ModelFiles, model_files, write_manifest
from scheduler.slo import SloPolicy
from tests.server.probe_runtime import ProbeRuntime

WEIGHTS = "tiny-random"
MODELS = ["tiny-a", "tiny-b"]
TINY_B_SAMPLING = SamplingDefaults(temperature=0.3, top_p=0.8)   # tiny-a keeps OpenAI's defaults
CONTEXT = TINY.max_position_embeddings
# These tests check the server, not SLO attainment: on a busy shared machine the scheduler must not
# drop a request because its first token came late.
RELAXED = SloPolicy(ttft_floor=60.0, ttft_cap=60.0, tpot=5.0)


def wait_until(condition, timeout_s: float = 10.0) -> None:
    """For effects the runtime applies between steps (an abort frees its blocks before the next step)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        time.sleep(0.01)


class LiveServer:
    """The app over `runtime`, served as `serve` does (`GracefulServer`), in a background thread on a
    port the OS picked."""

    def __init__(self, runtime):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = GracefulServer(create_app(runtime, lifespan=runtime_lifespan(runtime)), runtime,
                                     log_level="warning", lifespan="on")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def write_tiny_model(home: Path, tokenizer_from: ModelFiles, name: str = WEIGHTS) -> None:
    """A prepared-model cache entry `name` with random TINY weights and the given model's tokenizer."""
    files = model_files(name, home)
    files.dir.mkdir(parents=True)
    tokenizer = Tokenizer(tokenizer_from)
    config = dataclasses.replace(TINY, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id)
    save_file(random_tensors(config, seed=1), str(files.weights))
    files.config.write_text(json.dumps(dataclasses.asdict(config)))
    shutil.copy(tokenizer_from.tokenizer, files.tokenizer)
    shutil.copy(tokenizer_from.tokenizer_config, files.tokenizer_config)
    write_manifest(files, source={"test": "random TINY weights, SmolLM2 tokenizer"})


@pytest.fixture(scope="session")
def tiny_home(prepared_model, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("tiny-home")
    write_tiny_model(home, prepared_model)
    return home


@pytest.fixture(scope="session")
def tiny_loaded(tiny_home) -> LoadedModel:
    """The served model, loaded outside the server (for the engine's own greedy output)."""
    return load_model(WEIGHTS, get_kernels("reference"), home=tiny_home)


def tiny_runtime(home: Path) -> ProbeRuntime:
    """The two tiny names on one CPU device, reference kernels, relaxed SLOs."""
    catalogue = Catalogue([ModelSpec(MODELS[0], WEIGHTS), ModelSpec(MODELS[1], WEIGHTS, TINY_B_SAMPLING)])
    return ProbeRuntime(LiveRuntime(RuntimeOptions(
        catalogue=catalogue, devices=[DeviceSpec("cpu:0", 1 << 30)], backend="reference", home=home,
        profile_grid=QUICK_GRID, slo=RELAXED)))


@pytest.fixture(scope="session")
def runtime(tiny_home) -> ProbeRuntime:
    return tiny_runtime(tiny_home)


@pytest.fixture(scope="session")
def live_server(runtime):
    with LiveServer(runtime) as server:
        yield server


@pytest.fixture(autouse=True)
def healthy_runtime(request):
    """Faults injected by one test never leak into the next."""
    yield
    if "runtime" in request.fixturenames:
        request.getfixturevalue("runtime").heal()


@pytest.fixture
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def http(live_server):
    with httpx.Client(base_url=live_server.url, timeout=30) as c:
        yield c
