"""Execute-while-load (λScale on one machine) on the real SmolLM2: a cold model's first prefill starts
before its last layer has arrived, and its tokens equal those of a fully loaded model."""
from __future__ import annotations

import functools
import time

import pytest

from kernels.cpu import CpuKernels
from models.llama import HEAD_PART, LlamaModel, layer_part
from refengine.engine.instance import Instance
from refengine.engine.loader import load_llama
from refengine.engine.sequence import SamplingParams
from refengine.store.chunked_read import FileReader
from refengine.store.model_store import ModelStore

PROMPT = [1, 504, 3458, 282, 4649, 314, 216]      # a few ordinary SmolLM2 token ids
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


def greedy(model: LlamaModel) -> list[int]:
    instance = Instance(model, num_blocks=8)
    seq = instance.add_request(PROMPT, PARAMS)
    while instance.step() is not None:
        pass
    return seq.output_ids


@pytest.fixture(scope="module")
def expected(smollm2) -> list[int]:
    return greedy(smollm2.model)


def test_tokens_equal_a_fully_loaded_model(prepared_model, expected) -> None:
    model = load_llama(prepared_model, CpuKernels(bf16=False), execute_while_load=True)
    assert greedy(model) == expected


def test_first_layer_runs_before_the_last_one_arrives(prepared_model, expected, monkeypatch) -> None:
    """One reader thread, 30 ms per 16 MiB chunk: the model arrives over about a second."""
    real_read = FileReader.read_into

    def slow_read(self, buffer, offset):
        time.sleep(0.03)
        real_read(self, buffer, offset)

    monkeypatch.setattr(FileReader, "read_into", slow_read)
    store = ModelStore(threads=1)
    lease = store.load(prepared_model, CpuKernels(bf16=False))
    model, arrival = lease.model, lease.load.arrival
    computed: dict[str, float] = {}
    model.forward = functools.partial(LlamaModel.forward, model,
                                      observe=lambda name, _: computed.setdefault(name, time.perf_counter()))
    assert greedy(model) == expected
    last = layer_part(model.config.num_hidden_layers - 1)
    assert arrival.ready_at[HEAD_PART] < computed["layer0"] < arrival.ready_at[last]
    assert computed["layer0"] >= arrival.ready_at[layer_part(0)]
    lease.release()
    store.close()
