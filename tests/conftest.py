"""Shared fixtures: the golden directory, tiny random models for fast engine tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kernels import get_kernels
from models.llama import LlamaModel, LlamaWeights
from models.random_weights import TINY, random_tensors
from refengine.engine.instance import Instance

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO.parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.fail(f"golden outputs not found at {GOLDEN}: the repo is expected to sit beside shared/")
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_model() -> LlamaModel:
    kernels = get_kernels("reference")
    return LlamaModel(TINY, LlamaWeights.from_hf(random_tensors(TINY, seed=0), TINY, kernels), kernels)


def random_prompt(length: int, seed: int, vocab: int = TINY.vocab_size) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, length).tolist()


def run_to_end(instance: Instance, max_steps: int = 10_000) -> list:
    """Step until idle; return the StepResults."""
    results = []
    for _ in range(max_steps):
        result = instance.step()
        if result is None:
            return results
        results.append(result)
    raise AssertionError("instance did not drain")


@pytest.fixture(scope="session")
def prepared_model(tmp_path_factory):
    """The real SmolLM2-135M-Instruct prepared once per session into a private cache home (seconds)."""
    from refengine.store.prepare import prepare
    return prepare(home=tmp_path_factory.mktemp("refengine-home"), progress=False)


@pytest.fixture(scope="session")
def model_home(prepared_model) -> Path:
    return prepared_model.dir.parent.parent


@pytest.fixture(scope="session")
def smollm2(model_home):
    """The real SmolLM2-135M-Instruct on the fast CPU backend (each of its ops is checked against
    the numpy reference in tests/kernels; the golden suite then checks the whole model)."""
    from kernels.cpu import CpuKernels
    from refengine.engine.loader import load_model
    return load_model("smollm2-135m-instruct", CpuKernels(bf16=False), home=model_home)   # fp32 throughout
