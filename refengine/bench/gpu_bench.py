"""Decode and prefill throughput of the CuPy backend, eager and CUDA-graph, beside its physical bound
and PyTorch + transformers eager on the same GPU in the same run.

Weights are random, of the exact SmolLM2-135M shape (speed does not depend on the values; the real
ones need not travel). A decode step is timed as the engine runs it: forward, then `argmax` with its
device-to-host copy, median over many steps. The bound of a decode step is reading every weight once
plus the batch's cached keys and values, at the device-to-device copy bandwidth measured here.

    python -m refengine.bench.gpu_bench [--json out.json] [--no-hf]
"""
from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable

import cupy
import numpy as np

from kernels import get_kernels
from kernels.gpu_graph import GraphedDecodeModel
from models.llama import LlamaModel, LlamaWeights
from models.random_weights import SMOLLM2_135M, random_tensors
from refengine.bench.steps import (BLOCK_TOKENS, decode_step, median_seconds, prefill_tokens_per_s,
                                   random_cache)

def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = cupy.random.random(nbytes // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for i in range(repeats + 2):
        start.record()
        cupy.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes,
                                      cupy.cuda.runtime.memcpyDeviceToDevice, cupy.cuda.get_current_stream().ptr)
        stop.record()
        stop.synchronize()
        if i >= 2:
            times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return 2 * nbytes / statistics.median(times)


def bench_decode(model: LlamaModel, batch: int, context: int, bandwidth: float, repeats: int) -> dict:
    config, kern = model.config, model.kernels
    step = decode_step(config, batch, context, np.random.default_rng(batch))
    k_cache, v_cache = random_cache(model, int(step.block_tables.size))
    graphed = GraphedDecodeModel(model)
    eager_s = median_seconds(lambda: kern.argmax(model.forward(step, k_cache, v_cache)), max(5, repeats // 4))
    graph_s = median_seconds(lambda: kern.argmax(graphed.forward(step, k_cache, v_cache)), repeats)
    # replays queued back to back, no host sync in between: the device time of a captured step
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(repeats):
        graphed.forward(step, k_cache, v_cache)
    stop.record()
    stop.synchronize()
    device_s = cupy.cuda.get_elapsed_time(start, stop) / 1e3 / repeats
    weight_bytes = model.weights.nbytes()
    kv_bytes = batch * (context + 1) * config.kv_bytes_per_token
    bound_s = (weight_bytes + kv_bytes) / bandwidth
    return {"batch": batch, "context": context, "eager_ms": eager_s * 1e3, "graph_ms": graph_s * 1e3,
            "graph_device_ms": device_s * 1e3, "eager_tok_s": batch / eager_s, "graph_tok_s": batch / graph_s,
            "bound_ms": bound_s * 1e3, "bound_tok_s": batch / bound_s, "weight_bytes": weight_bytes,
            "kv_bytes": kv_bytes}


def graph_us(run: Callable[[], object], copies: int = 30, replays: int = 20) -> float:
    """Device microseconds of `run`, captured `copies` times back to back in one CUDA graph."""
    stream = cupy.cuda.Stream()
    with stream:
        run()  # uploads and compiles outside the capture
        stream.begin_capture()
        for _ in range(copies):
            run()
        graph = stream.end_capture()
        graph.launch(stream)
        start, stop = stream.record(), cupy.cuda.Event()
        for _ in range(replays):
            graph.launch(stream)
        stop.record(stream)
        stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) * 1e3 / (copies * replays)


def op_breakdown(model: LlamaModel, batch: int, context: int) -> dict[str, float]:
    """Device microseconds of each op of one decode layer (layer 0's weights) and of the lm_head.
    Repeated in a graph, a layer's weights stay in L2, so the GEMV figures are a floor for a real
    step, whose weights come from DRAM."""
    config, kern, layer = model.config, model.kernels, model.weights.layers[0]
    step = decode_step(config, batch, context, np.random.default_rng(1))
    k_cache, v_cache = (c[0] for c in random_cache(model, int(step.block_tables.size)))
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    rng = np.random.default_rng(2)
    hidden = kern.asarray(rng.standard_normal((batch, config.hidden_size), dtype=np.float32))
    delta = kern.asarray(rng.standard_normal((batch, config.hidden_size), dtype=np.float32))
    qkv = kern.linear(hidden, layer.qkv)
    q = qkv[:, :heads * head_dim].reshape(batch, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(batch, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].reshape(batch, kv_heads, head_dim)
    gate_up = kern.linear(hidden, layer.gate_up)
    mlp_in = kern.silu_mul(gate_up)
    attn_in = kern.asarray(rng.standard_normal((batch, heads, head_dim), dtype=np.float32))
    ops = {
        "linear qkv": lambda: kern.linear(hidden, layer.qkv),
        "rope_write_kv": lambda: kern.rope_write_kv(q, k, v, step.positions, config.rope_theta, k_cache, v_cache,
                                                    step.slot_mapping),
        "decode_attention": lambda: kern.decode_attention(attn_in, k_cache, v_cache, step.block_tables,
                                                          step.context_lens, model.scale),
        "linear o": lambda: kern.linear(attn_in.reshape(batch, -1), layer.o),
        "add_rms_norm x2": lambda: kern.add_rms_norm(hidden, delta, layer.post_norm, config.rms_norm_eps),
        "linear gate_up": lambda: kern.linear(hidden, layer.gate_up),
        "silu_mul": lambda: kern.silu_mul(gate_up),
        "linear down": lambda: kern.linear(mlp_in, layer.down),
    }
    times = {name: graph_us(op) for name, op in ops.items()}
    times["add_rms_norm x2"] *= 2
    times["lm_head"] = graph_us(lambda: kern.linear(hidden, model.weights.lm_head), copies=5)
    return times


def bench_prefill(model: LlamaModel, num_tokens: int, repeats: int = 5) -> dict:
    tok_s = prefill_tokens_per_s(model, num_tokens, repeats)
    return {"tokens": num_tokens, "ms": num_tokens / tok_s * 1e3, "tok_s": tok_s}


def bench_hf(tensors: dict, model: LlamaModel, cases: list[tuple[int, int]], repeats: int) -> dict:
    """transformers eager decode for each (batch, context), and whether its greedy tokens agree with ours."""
    from refengine.bench.hf_baseline import build_hf_model, hf_decode_seconds, hf_greedy

    hf = build_hf_model(model.config, tensors)
    prompt = np.random.default_rng(7).integers(0, model.config.vocab_size, 24).tolist()
    ours = greedy_tokens(model, prompt, 12)
    theirs = hf_greedy(hf, prompt, 12)
    rows = []
    for batch, context in cases:
        seconds = hf_decode_seconds(hf, batch, context, repeats)
        rows.append({"batch": batch, "context": context, "ms": seconds * 1e3, "tok_s": batch / seconds})
    return {"agrees": ours == theirs, "ours": ours, "theirs": theirs, "decode": rows}


def greedy_tokens(model: LlamaModel, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy continuation through the engine's own step loop (prefill, then graph-captured decode)."""
    from refengine.engine.instance import Instance
    from refengine.engine.sequence import SamplingParams

    instance = Instance(GraphedDecodeModel(model), num_blocks=64, block_tokens=BLOCK_TOKENS)
    seq = instance.add_request(prompt, SamplingParams(max_tokens=num_tokens, ignore_eos=True))
    while instance.has_work:
        instance.step()
    return seq.output_ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--contexts", default="128,1024")
    parser.add_argument("--prefill", default="128,512,2048")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]

    config = SMOLLM2_135M
    tensors = random_tensors(config, seed=0)
    kern = get_kernels("cuda", "cuda:0")
    model = LlamaModel(config, LlamaWeights.from_hf(tensors, config, kern), kern)
    device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    bandwidth = copy_bandwidth()
    results = {"device": device, "copy_bandwidth_gb_s": bandwidth / 1e9, "weight_bytes": model.weights.nbytes(),
               "layers": config.num_hidden_layers,
               "decode": [bench_decode(model, b, c, bandwidth, args.repeats) for c in contexts for b in batches],
               "prefill": [bench_prefill(model, int(n)) for n in args.prefill.split(",")],
               "ops": {f"{b}x{c}": op_breakdown(model, b, c) for b, c in ((1, 1024), (64, 1024))}}
    if not args.no_hf:
        results["hf"] = bench_hf(tensors, model, [(b, c) for c in contexts for b in batches], max(10, args.repeats // 2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print_report(results)


def print_report(results: dict) -> None:
    print(f"{results['device']}: copy bandwidth {results['copy_bandwidth_gb_s']:.0f} GB/s, "
          f"weights {results['weight_bytes'] / 1e6:.0f} MB fp32")
    hf = {(r["batch"], r["context"]): r["tok_s"] for r in results.get("hf", {}).get("decode", [])}
    print(" batch context | eager tok/s | graph tok/s (ms, device ms) | bound tok/s  % | HF tok/s  graph/HF")
    for r in results["decode"]:
        theirs = hf.get((r["batch"], r["context"]), float("nan"))
        print(f" {r['batch']:5d} {r['context']:7d} | {r['eager_tok_s']:11.0f} | {r['graph_tok_s']:11.0f} "
              f"({r['graph_ms']:.3f}, {r['graph_device_ms']:.3f}) | {r['bound_tok_s']:11.0f} "
              f"{100 * r['graph_tok_s'] / r['bound_tok_s']:3.0f} | {theirs:8.0f} {r['graph_tok_s'] / theirs:7.1f}x")
    layers = results["layers"]
    for case, times in results["ops"].items():
        layer = sum(t for name, t in times.items() if name != "lm_head")
        print(f" ops at batch x context {case} (us, L2-warm): " + ", ".join(f"{n} {t:.1f}" for n, t in times.items())
              + f"; layer {layer:.1f}, x{layers} + lm_head = {layer * layers + times['lm_head']:.0f}")
    for r in results["prefill"]:
        print(f" prefill {r['tokens']:5d} tokens: {r['ms']:8.2f} ms = {r['tok_s']:9.0f} tok/s")
    if "hf" in results:
        print(f" transformers greedy tokens agree with ours: {results['hf']['agrees']}")


if __name__ == "__main__":
    main()
