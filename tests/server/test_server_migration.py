"""Live migration under a live stream, over real HTTP with the official `openai` client.

Two logical CPU devices with a pinned cost model (`bench migrate`'s scene) make the
scheduler's choice certain: a long stream of tiny-b decodes on cpu:0; a burst of three tiny-a
requests lands there too and would overload cpu:0's decode time, so tiny-b's instance, the smaller
batch, is preempted and its request live-migrated to a new instance on cpu:1 — rebuilt from its
tokens while cpu:0 keeps streaming, then taken over. The client reads one uninterrupted stream,
greedy or seeded: the sampler's state moves with the request.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from models.catalogue import Catalogue, ModelSpec
from refengine.bench.migrate_bench import PINNED_SLO, pinned_home
from refengine.engine.sequence import SamplingParams
from refengine.generate import PromptSpec, generate
from refengine.runtime.devices import DeviceSpec
from refengine.runtime.live import LiveRuntime, RuntimeOptions
from tests.server.conftest import MODELS, WEIGHTS, LiveServer

BURST, NEIGHBOUR = MODELS
PROMPT = "Once upon a time"
TOKENS = 96                      # the move completes after a few tokens; this outlasts it with room


@pytest.fixture
def two_devices(tiny_home, tmp_path):
    runtime = LiveRuntime(RuntimeOptions(
        Catalogue([ModelSpec(name, WEIGHTS) for name in MODELS]),
        [DeviceSpec("cpu:0", 1 << 30), DeviceSpec("cpu:1", 1 << 30)], keep_alive_s=5.0,
        backend="reference", home=pinned_home(tiny_home, tmp_path, "cpu-reference", WEIGHTS),
        slo=PINNED_SLO))
    with LiveServer(runtime) as server:
        yield server, runtime


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.8, "seed": 5}],
                         ids=["greedy", "seeded"])
def test_a_stream_migrated_mid_way_equals_the_unmigrated_output(two_devices, tiny_loaded, sampling):
    server, runtime = two_devices
    expected = generate(tiny_loaded, [PromptSpec(PROMPT)],
                        SamplingParams(max_tokens=TOKENS, ignore_eos=True, **sampling))[0].text
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    chunks = iter(client.completions.create(model=NEIGHBOUR, prompt=PROMPT, max_tokens=TOKENS, stream=True,
                                            extra_body={"ignore_eos": True}, **sampling))
    text = next(chunks).choices[0].text                                  # decoding on cpu:0
    with ThreadPoolExecutor(3) as pool:
        burst = [pool.submit(client.completions.create, model=BURST, prompt=p, max_tokens=64,
                             extra_body={"ignore_eos": True}) for p in ("One", "Two", "Three")]
        text += "".join(chunk.choices[0].text for chunk in chunks)
        assert all(len(f.result().choices[0].text) > 0 for f in burst)
    status = runtime.status()
    assert status.migrations == 1 and status.preemptions == 0           # moved, not re-prefilled
    assert text == expected
    # the source instance let go of its blocks at the hand-over, was unloaded and is gone
    assert [(i.model, i.device) for i in status.instances if i.model == NEIGHBOUR] == [(NEIGHBOUR, "cpu:1")]
    assert status.device_memory_actual["cpu:0"] == sum(i.memory_bytes for i in status.instances
                                                       if i.device == "cpu:0")
