"""`python cli.py bench ...`: engine throughput and load times, printed and written to docs/BENCHMARKS.md."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from kernels import backend_for_device, get_kernels
from models.catalogue import DEFAULT_MODEL
from refengine.bench import bandwidth, engine_bench
from refengine.bench.report import BENCHMARKS, markdown_table, update_section


def _load(device: str, backend: str | None):
    from refengine.engine.loader import load_model
    name = backend_for_device(device, backend)
    return name, load_model(DEFAULT_MODEL, get_kernels(name, device))


@click.group()
def bench() -> None:
    """Measure the engine (medians) and record the figures in docs/BENCHMARKS.md."""


_device = click.option("--device", default="cpu", show_default=True)
_backend = click.option("--backend", type=click.Choice(["reference", "cpu", "cuda"]))
_write = click.option("--write/--no-write", default=True, show_default=True, help="Update docs/BENCHMARKS.md.")
_peers = click.option("--peers", is_flag=True,
                      help="Side by side with llama.cpp and transformers (CPU) or transformers eager and CUDA "
                           "graphs (GPU), each engine in turn, median over --rounds.")
_rounds = click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1),
                       help="With --peers: rounds, engines taking turns.")
_random_weights = click.option("--random-weights", is_flag=True,
                               help="With --peers: random weights of the SmolLM2 shape (a GPU machine without "
                                    "the model package); speed does not depend on the values.")


@bench.command()
@_device
@_backend
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1),
              help="Sequences per step [default: 1, 8, 32; with --peers 1, 8, 32, 64].")
@click.option("--prompt-len", default=128, show_default=True)
@click.option("--new-tokens", default=128, show_default=True)
@_peers
@click.option("--context", "contexts", multiple=True, type=click.IntRange(min=1), default=(128, 1024),
              show_default=True, help="With --peers: tokens each sequence already holds.")
@_rounds
@_random_weights
@_write
def decode(device: str, backend: str | None, batches: tuple[int, ...], prompt_len: int, new_tokens: int,
           peers: bool, contexts: tuple[int, ...], rounds: int, random_weights: bool, write: bool) -> None:
    """Decode tokens/s per batch size, beside the memory-bandwidth bound (and peers with --peers)."""
    if peers:
        cases = [("decode", b, c) for c in contexts for b in batches or (1, 8, 32, 64)]
        return _side_by_side(device, cases, rounds, random_weights, write)
    batches = batches or (1, 8, 32)
    name, loaded = _load(device, backend)
    model = loaded.model
    bw = bandwidth.measure_copy_bandwidth()
    click.echo(f"copy bandwidth {bw / 1e9:.1f} GB/s; weights {loaded.model.weights.nbytes() / 1e6:.0f} MB")
    rows = []
    for batch in batches:
        result = engine_bench.measure_decode(model, batch, prompt_len, new_tokens)
        context = prompt_len + new_tokens // 2
        bound = bandwidth.decode_bound_tokens_per_s(model.config, model.weights.nbytes(), batch, context, bw)
        rows.append([name, batch, prompt_len, new_tokens, f"{result.median_step_s * 1e3:.1f}",
                     f"{result.tokens_per_s:.1f}", f"{bound:.0f}", f"{100 * result.tokens_per_s / bound:.0f}%"])
        click.echo(f"{name} batch {batch:3d}: {result.tokens_per_s:8.1f} tok/s (median step "
                   f"{result.median_step_s * 1e3:.1f} ms; bandwidth bound {bound:.0f} tok/s)")
    if write:
        table = markdown_table(["backend", "batch", "prompt", "new tokens", "median step ms", "tok/s",
                                "bandwidth bound tok/s", "of bound"], rows)
        note = (f"Copy bandwidth measured in the same run: {bw / 1e9:.1f} GB/s (numpy copy, read + write). "
                f"Bound = batch × bandwidth ÷ (fp32 weights + K/V of the mean context), per step.")
        update_section(f"decode-{name}", f"Decode, {name} backend", f"{table}\n\n{note}")


@bench.command()
@_device
@_backend
@click.option("--length", "lengths", multiple=True, type=click.IntRange(min=1),
              help="Prompt tokens [default: 128, 512, 1024; with --peers 128, 512, 2048].")
@_peers
@_rounds
@_random_weights
@_write
def prefill(device: str, backend: str | None, lengths: tuple[int, ...], peers: bool, rounds: int,
            random_weights: bool, write: bool) -> None:
    """Prefill tokens/s for one prompt per iteration (beside peers with --peers)."""
    if peers:
        return _side_by_side(device, [("prefill", n) for n in lengths or (128, 512, 2048)], rounds,
                             random_weights, write)
    lengths = lengths or (128, 512, 1024)
    name, loaded = _load(device, backend)
    rows = []
    for length in lengths:
        result = engine_bench.measure_prefill(loaded.model, length)
        rows.append([name, length, f"{result.median_step_s * 1e3:.0f}", f"{result.tokens_per_s:.0f}"])
        click.echo(f"{name} prefill {length:5d}: {result.tokens_per_s:8.0f} tok/s ({result.median_step_s * 1e3:.0f} ms)")
    if write:
        update_section(f"prefill-{name}", f"Prefill, {name} backend",
                       markdown_table(["backend", "prompt tokens", "median ms", "tok/s"], rows))


def _side_by_side(device: str, cases: list[tuple], rounds: int, random_weights: bool, write: bool) -> None:
    """Every engine of this device kind on `cases`, then tables, targets and (decode) a plot."""
    from refengine.bench import comparison_report as report
    from refengine.bench import side_by_side
    kind = "cuda" if device.startswith("cuda") else "cpu"
    options = side_by_side.Options(device, random_weights)
    config, weight_bytes = side_by_side.model_shape(options)
    if kind == "cuda":
        import cupy

        from refengine.bench.gpu_bench import copy_bandwidth
        bw = copy_bandwidth()
        where = f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}. "
    else:
        bw, where = bandwidth.measure_copy_bandwidth(), ""
    click.echo(f"copy bandwidth {bw / 1e9:.1f} GB/s; weights {weight_bytes / 1e6:.0f} MB")
    results = side_by_side.run(cases, options, rounds, progress=click.echo)
    bounds = {c: bandwidth.decode_bound_tokens_per_s(config, weight_bytes, c[1], c[2] + 1, bw)
              for c in cases if c[0] == "decode"}
    mode = cases[0][0]
    table = report.decode_table(results, bounds) if mode == "decode" else report.prefill_table(results)
    click.echo(table)
    targets = report.targets_table(results, bounds, kind)
    click.echo(targets)
    if not write:
        return
    weights = "random weights of the SmolLM2-135M shape" if random_weights else "SmolLM2-135M-Instruct"
    body = (f"{where}Command: `python cli.py bench {mode} --device {device} --peers"
            f"{' --random-weights' if random_weights else ''}`; {weights}, float32 unless "
            f"named; tokens/s, median of {rounds} rounds (engines take turns, each round in a fresh process "
            f"on CPU). Copy bandwidth measured in the same run: {bw / 1e9:.1f} GB/s; bound = batch × "
            f"bandwidth ÷ (weights + cached K/V).\n\n{table}\n\n{targets}")
    if mode == "decode":
        png = BENCHMARKS.parent / f"decode_vs_batch_{kind}.png"
        report.plot(results, bounds, png, f"Decode tokens/s vs batch ({kind}, {weights})")
        body += f"\n\n![decode tokens/s vs batch]({png.name})"
    update_section(f"{mode}-peers-{kind}", f"{mode.capitalize()} side by side ({kind})", body)


@bench.command()
@_write
def load(write: bool) -> None:
    """Time `prepare` (cold, into a fresh cache, and a no-op rerun) and loading the weights."""
    from refengine.engine.loader import load_model
    from refengine.store.prepare import prepare
    rows = []
    with tempfile.TemporaryDirectory() as home:
        for label in ("prepare (cold)", "prepare (already prepared)"):
            started = time.perf_counter()
            files = prepare(home=Path(home), progress=False)
            rows.append([label, f"{time.perf_counter() - started:.2f}"])
        size = files.weights.stat().st_size
        loads = [load_model(DEFAULT_MODEL, get_kernels("reference"), home=Path(home)).load_s for _ in range(3)]
        rows.append([f"load safetensors → model ({size / 1e6:.0f} MB, median of 3)", f"{sorted(loads)[1]:.2f}"])
    for label, seconds in rows:
        click.echo(f"{label}: {seconds} s")
    if write:
        update_section("load", "Prepare and load", markdown_table(["what", "seconds"], rows))


@bench.command()
@_device
@_backend
@click.option("--force", is_flag=True, help="Measure again even if a cached table exists.")
def profile(device: str, backend: str | None, force: bool) -> None:
    """Measure the scheduler's per-iteration latency table for this device (cached in the model home)."""
    from refengine.runtime.profile import cached_table
    from refengine.store.cache import model_home
    from scheduler.costmodel import profile_filename
    name, loaded = _load(device, backend)
    kind = "gpu" if device.startswith("cuda") else "cpu"
    directory = model_home() / "profiles"
    path = directory / profile_filename(DEFAULT_MODEL, f"{kind}-{name}")
    if force:
        path.unlink(missing_ok=True)
    table = cached_table(loaded.model, DEFAULT_MODEL, f"{kind}-{name}", directory)
    click.echo(f"{path}")
    click.echo("prefill ms: " + ", ".join(f"{int(t)}→{l * 1e3:.1f}" for t, l in zip(table.prefill_tokens, table.prefill_latency)))
    for row in table.decode_rows:
        click.echo(f"decode ms at context {int(row.context)}: " +
                   ", ".join(f"b{int(b)}→{l * 1e3:.1f}" for b, l in zip(row.batch, row.latency)))
