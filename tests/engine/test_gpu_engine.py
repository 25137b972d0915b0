"""The engine on the CuPy backend against the numpy reference, end to end, on random weights of the
exact SmolLM2-135M shape: logits of a prefill and a decode step within tolerance, greedy tokens
equal for a mixed batch run to completion, and CUDA-graph decode equal to eager decode (also across
a KV-cache resize, which moves the cache the graphs point at)."""
from __future__ import annotations

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="needs CUDA and CuPy: cupy is not installed")
if not cupy.is_available():
    pytest.skip("needs CUDA and CuPy: no CUDA device is visible", allow_module_level=True)

from kernels import get_kernels  # noqa: E402
from kernels.gpu_graph import GraphedDecodeModel  # noqa: E402
from models.llama import LlamaModel, LlamaWeights  # noqa: E402
from models.random_weights import SMOLLM2_135M, random_tensors  # noqa: E402
from refengine.engine.instance import Instance  # noqa: E402
from refengine.engine.sequence import SamplingParams  # noqa: E402

pytestmark = pytest.mark.gpu
CONFIG = SMOLLM2_135M
PROMPT_LENGTHS = [3, 17, 40, 64, 100]
MAX_TOKENS = [6, 9, 4, 12, 8]  # sequences finish at different steps, so the decode batch shrinks


@pytest.fixture(scope="module")
def tensors() -> dict[str, np.ndarray]:
    return random_tensors(CONFIG, seed=0)


def build(tensors: dict[str, np.ndarray], backend: str) -> LlamaModel:
    kernels = get_kernels(backend, "cuda:0")
    return LlamaModel(CONFIG, LlamaWeights.from_hf(tensors, CONFIG, kernels), kernels)


@pytest.fixture(scope="module")
def reference_model(tensors) -> LlamaModel:
    return build(tensors, "reference")


@pytest.fixture(scope="module")
def gpu_model(tensors) -> LlamaModel:
    return build(tensors, "cuda")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


class LogitsRecorder:
    """Stands in for a model and keeps every step's logits on the host."""

    def __init__(self, model):
        self.model, self.logits = model, []

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def forward(self, step, k_cache, v_cache):
        logits = self.model.forward(step, k_cache, v_cache)
        self.logits.append(self.model.kernels.to_numpy(logits))
        return logits


def generate(model, prompts: list[list[int]], resize_at: int | None = None) -> list[list[int]]:
    """Greedy outputs of all prompts batched in one instance; optionally grow its KV cache mid-way."""
    instance = Instance(model, num_blocks=48, block_tokens=16)
    seqs = [instance.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in zip(prompts, MAX_TOKENS)]
    steps = 0
    while instance.has_work:
        instance.step()
        steps += 1
        if steps == resize_at:
            instance.resize_kv(64)
    return [seq.output_ids for seq in seqs]


def rel_err(out: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(out - expected) / np.linalg.norm(expected))


def test_logits_match_the_reference(reference_model, gpu_model, prompts):
    reference, gpu = LogitsRecorder(reference_model), LogitsRecorder(gpu_model)
    assert generate(gpu, prompts[:3]) == generate(reference, prompts[:3])
    assert len(gpu.logits) == len(reference.logits)
    for step, (ours, expected) in enumerate(zip(gpu.logits, reference.logits)):
        assert rel_err(ours, expected) < 1e-4, f"step {step}"


def test_greedy_tokens_match_the_reference_eager_and_graphed(reference_model, gpu_model, prompts):
    expected = generate(reference_model, prompts)
    assert generate(gpu_model, prompts) == expected
    graphed = GraphedDecodeModel(gpu_model)
    assert generate(graphed, prompts) == expected
    assert graphed.num_graphs >= 3  # decode batches 5, 4, 3, 2, 1 fall in buckets 8, 4, 2, 1


def test_graph_decode_logits_equal_eager(gpu_model, prompts):
    eager, graphed = LogitsRecorder(gpu_model), LogitsRecorder(GraphedDecodeModel(gpu_model))
    assert generate(graphed, prompts) == generate(eager, prompts)
    for step, (ours, expected) in enumerate(zip(graphed.logits, eager.logits)):
        assert rel_err(ours, expected) < 1e-5, f"step {step}"


def test_graphs_follow_a_kv_cache_resize(gpu_model, prompts):
    assert generate(GraphedDecodeModel(gpu_model), prompts, resize_at=4) == generate(gpu_model, prompts)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 3}], ids=["greedy", "seeded"])
def test_a_sequence_migrated_between_gpu_instances_keeps_its_tokens(gpu_model, prompts, sampling):
    """Live migration on the GPU: the destination rebuilds the KV in a round while the source decodes
    on, then adopts the sequence, which goes on with the tokens it would have made unmoved."""
    params = SamplingParams(max_tokens=12, ignore_eos=True, **sampling)
    alone = Instance(gpu_model, num_blocks=16)
    unmoved = alone.add_request(prompts[2], params)
    while alone.has_work:
        alone.step()
    source, dest = Instance(gpu_model, num_blocks=16), Instance(gpu_model, num_blocks=16)
    seq = source.add_request(prompts[2], params)
    for _ in range(4):
        source.step()
    dest.prefetch(9, seq.token_ids)
    assert dest.step().tokens == ()
    source.step()
    source.step()
    caught_up = dest.take_over(9, source.export(seq.seq_id))     # samples the 7th token
    moved = dest.running[0]
    while dest.has_work:
        dest.step()
    assert len(caught_up.tokens) == 1 and moved.seq_id == 9
    assert moved.output_ids == unmoved.output_ids and source.kv.num_used_blocks == 0
