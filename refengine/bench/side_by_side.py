"""refengine's backends beside llama.cpp and PyTorch + transformers, measured in one run.

`python cli.py bench decode --peers` and `bench prefill --peers` land here. Every engine runs the
same cases on the same weights (SmolLM2-135M float32; `--random-weights` builds random ones of the
exact shape, for a GPU machine where the real ones cannot travel):
- decode: B sequences already holding `context` cached tokens advance one token per step; the
  median step gives B / step tokens/s (see `steps.py` for why the context is filled untimed);
- prefill: one prompt of N tokens in one step.

Fairness on a small shared CPU: each engine runs each round in a fresh process (OpenMP pools,
BLAS threading and JIT caches of one engine cannot slow another), the engines take turns round by
round, and the figure quoted is the median over rounds. A target's ratio is also taken within each
round, where its two engines ran minutes apart at most: on a shared VM whose speed drifts between
rounds, the range of those ratios shows whether a verdict holds in every round or rests on one. On
a GPU every engine shares one process, as the GPU does the work.
"""
from __future__ import annotations

import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable

Case = tuple  # ("decode", batch, context) or ("prefill", tokens)
Results = dict[str, dict[Case, float]]    # engine -> case -> tokens/s
Rounds = dict[str, dict[Case, list[float]]]    # engine -> case -> tokens/s of each round, in order


@dataclass(frozen=True)
class Options:
    device: str                # "cpu" or "cuda[:N]"
    random_weights: bool       # random SmolLM2-shaped weights instead of the prepared ones
    repeats: int = 16          # timed steps per decode case


BF16_WEIGHTS_ENGINE = "refengine cpu bf16 weights"   # the cpu-bf16-weights backend: decode reads bf16 copies


def engines_for(device: str) -> list[str]:
    """The engines compared on this kind of device, ours first."""
    if device.startswith("cuda"):
        return ["refengine cuda eager", "refengine cuda graph", "transformers cuda eager"]
    from kernels.bf16 import Bf16Matmul
    bf16 = Bf16Matmul.create(required=False)
    ours = ["refengine cpu fp32"] + ([f"refengine cpu {bf16.unit}"] if bf16 else []) + [BF16_WEIGHTS_ENGINE]
    return ours + ["llama.cpp F32", "llama.cpp F16", "llama.cpp Q4_1", "transformers fp32"]


# ---------------------------------------------------------------- one engine, every case
def _weights(options: Options):
    """(config, HF-named float32 tensors, model cache files or None)."""
    from models.random_weights import SMOLLM2_135M, random_tensors
    if options.random_weights:
        return SMOLLM2_135M, random_tensors(SMOLLM2_135M, seed=0), None
    from safetensors.numpy import load_file

    from models.catalogue import DEFAULT_MODEL
    from models.config import LlamaConfig
    from refengine.engine.loader import ensure_prepared
    files = ensure_prepared(DEFAULT_MODEL, progress=False)
    return LlamaConfig.from_json(files.config), load_file(str(files.weights)), files


def measure_engine(engine: str, cases: list[Case], options: Options) -> dict[Case, float]:
    """Tokens/s of `engine` for each case (run in a fresh process on CPU)."""
    decode, prefill = _runners(engine, options)
    return {case: (decode(case[1], case[2]) if case[0] == "decode" else prefill(case[1])) for case in cases}


def _runners(engine: str, options: Options) -> tuple[Callable[[int, int], float], Callable[[int], float]]:
    """(decode(batch, context), prefill(tokens)) -> tokens/s, for one engine."""
    from refengine.bench import peers, steps
    config, tensors, files = _weights(options)
    if engine.startswith("refengine"):
        from models.llama import LlamaModel, LlamaWeights
        if engine.startswith("refengine cuda"):
            from kernels.gpu import GpuKernels
            kern = GpuKernels(options.device)
        else:
            from kernels.cpu import CpuKernels
            kern = (CpuKernels(bf16_weights=True) if engine == BF16_WEIGHTS_ENGINE
                    else CpuKernels(bf16=not engine.endswith("fp32")))
        model = LlamaModel(config, LlamaWeights.from_hf(tensors, config, kern), kern)
        if engine.endswith("graph"):
            from kernels.gpu_graph import GraphedDecodeModel
            model = GraphedDecodeModel(model)
        elif not engine.startswith("refengine cuda"):
            from refengine.engine.loader import with_fast_decode
            # as serving runs it (small decode steps in one region) on a quiet machine, where the
            # thread tuner keeps every thread once it has tried fewer: its tries are left out, as they
            # would be two of a prefill's three timed runs (`bench contention` measures the tuner)
            model = with_fast_decode(model, tune_threads=False)
        return (lambda b, c: steps.decode_tokens_per_s(model, b, c, options.repeats),
                lambda n: steps.prefill_tokens_per_s(model, n))
    if engine.startswith("llama.cpp"):
        from refengine.bench.gguf_export import exported_gguf, source_gguf
        from refengine.store.cache import model_home
        precision = engine.split()[-1]
        gguf = source_gguf() if precision == "Q4_1" else exported_gguf(model_home() / "peers", precision.lower())
        return (lambda b, c: peers.llama_cpp_decode(gguf, b, c, steps=options.repeats),
                lambda n: peers.llama_cpp_prefill(gguf, n))
    if engine == "transformers fp32":
        model = peers.load_transformers(files.weights.parent)
        return (lambda b, c: peers.transformers_decode(model, b, c, steps=options.repeats),
                lambda n: peers.transformers_prefill(model, n))
    if engine == "transformers cuda eager":
        from refengine.bench.hf_baseline import build_hf_model, hf_decode_seconds
        model = build_hf_model(config, tensors)
        return (lambda b, c: b / hf_decode_seconds(model, b, c, options.repeats),
                lambda n: float("nan"))
    raise ValueError(f"unknown engine {engine!r}")


# ---------------------------------------------------------------- every engine, every round
def run(cases: list[Case], options: Options, rounds: int, engines: list[str] | None = None,
        progress: Callable[[str], None] = print) -> Rounds:
    """Tokens/s of each engine on each case in each of `rounds` rounds, engines taking turns."""
    engines = engines or engines_for(options.device)
    samples: Rounds = {e: {c: [] for c in cases} for e in engines}
    for r in range(rounds):
        for engine in engines:
            figures = _in_fresh_process(engine, cases, options)
            for case, value in figures.items():
                samples[engine][case].append(value)
            progress(f"round {r + 1}/{rounds} {engine}: " +
                     ", ".join(f"{_label(c)} {v:.1f}" for c, v in figures.items()))
    return samples


def medians(rounds: Rounds) -> Results:
    """The figure quoted for each engine and case: its median over the rounds."""
    return {e: {c: statistics.median(v) for c, v in by_case.items()} for e, by_case in rounds.items()}


def _in_fresh_process(engine: str, cases: list[Case], options: Options) -> dict[Case, float]:
    if options.device.startswith("cuda"):
        return measure_engine(engine, cases, options)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_engine, engine, cases, options).result()


def _label(case: Case) -> str:
    return f"{case[1]}x{case[2]}" if case[0] == "decode" else f"prefill {case[1]}"


def model_shape(options: Options):
    """(config, bytes of float32 weights a decode step reads, the tied embedding once)."""
    config, tensors, _ = _weights(options)
    tied = config.tie_word_embeddings
    return config, sum(t.nbytes for name, t in tensors.items() if name != "lm_head.weight" or not tied)


