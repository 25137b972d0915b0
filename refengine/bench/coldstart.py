"""Time to first token of a cold request: load the model, then prefill a short prompt (ServerlessLLM's
startup latency; λScale's execute-while-load is the variant that starts the prefill before the load
ends). Measured from the disk (page cache dropped) and from the store's host cache, with and
without execute-while-load, beside the same request on a model loaded from safetensors and on a
model already in place (the floor)."""
from __future__ import annotations

import time

from kernels.interface import Kernels
from models.llama import LlamaModel
from refengine.bench.load_bench import Case, safetensors_model
from refengine.engine.instance import Instance
from refengine.engine.sequence import SamplingParams
from refengine.store.cache import ModelFiles
from refengine.store.chunked_read import drop_page_cache
from refengine.store.model_store import ModelStore

FIRST_TOKEN = SamplingParams(max_tokens=1, ignore_eos=True)


def first_token(model: LlamaModel, prompt: list[int]) -> None:
    """One prefill step of `prompt` on a fresh instance: its first token."""
    instance = Instance(model, num_blocks=-(-(len(prompt) + 1) // 16))
    instance.add_request(prompt, FIRST_TOKEN)
    instance.step()


def store_case(store: ModelStore, files: ModelFiles, kernels: Kernels, device: str, prompt: list[int],
               execute_while_load: bool, from_host: bool, after_load: list[float]) -> Case:
    """From asking the store for the model to its first token, with the model cold in the given tier.
    Each run appends to `after_load` how long the first token came after the last weight was
    resident: the part of the prefill the load did not hide."""
    def request() -> None:
        with store.load(files, kernels, device) as lease:
            if not execute_while_load:
                lease.load.wait()
            first_token(lease.model, prompt)
            after_load.append(time.perf_counter() - lease.load.wait().finished)

    def make_cold() -> None:
        if not from_host:
            store.host.discard(files.dir.name)
            drop_page_cache(files.packed)
        elif not store.host.holds(files.dir.name):
            store.load(files, kernels, device).release()

    return request, make_cold


def safetensors_case(files: ModelFiles, kernels: Kernels, prompt: list[int]) -> Case:
    """The same request on a model built from the safetensors (safe_open, tensor by tensor)."""
    return (lambda: first_token(safetensors_model(files, kernels), prompt)), lambda: drop_page_cache(files.weights)


def resident_case(model: LlamaModel, prompt: list[int]) -> Case:
    return (lambda: first_token(model, prompt)), None
