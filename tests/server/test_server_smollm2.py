"""The real SmolLM2-135M-Instruct behind the server: streamed greedy text equals the engine's own.

Slow (the numpy reference backend profiles and prefills for seconds on a busy machine): `pytest -m slow`.
"""
from __future__ import annotations

import openai
import pytest

from models.catalogue import DEFAULT_MODEL, Catalogue
from refengine.engine.sequence import SamplingParams
from refengine.generate import PromptSpec, generate
from refengine.runtime.devices import DeviceSpec
from refengine.runtime.live import LiveRuntime, RuntimeOptions
from refengine.runtime.profile import QUICK_GRID
from refengine.server.app import create_app, runtime_lifespan
from tests.server.conftest import RELAXED, LiveServer
from tests.server.probe_runtime import ProbeRuntime

QUESTION = "What is the capital of France?"


@pytest.mark.slow
def test_streamed_chat_equals_engine_greedy(smollm2, model_home):
    expected = generate(smollm2, [PromptSpec(QUESTION, chat=True)], SamplingParams(max_tokens=8))[0]
    runtime = ProbeRuntime(LiveRuntime(RuntimeOptions(
        catalogue=Catalogue.default(), devices=[DeviceSpec("cpu:0", 4 << 30)], backend="reference",
        home=model_home, profile_grid=QUICK_GRID, slo=RELAXED)))
    with LiveServer(create_app(runtime, lifespan=runtime_lifespan(runtime))) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        chunks = list(client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=0,
            stream=True, stream_options={"include_usage": True}))
        assert runtime.idle()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text and "Paris" in text
    assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens
    assert chunks[-1].usage.completion_tokens == expected.output_tokens
