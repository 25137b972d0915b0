"""`python cli.py bench ...`: engine throughput and load times, printed and written to docs/BENCHMARKS.md."""
from __future__ import annotations

import functools
import os
import re
import sys
import time
from typing import Callable

import click

from kernels import BACKENDS, BF16_WEIGHTS, backend_for_device, check_device, get_kernels
from models.catalogue import DEFAULT_MODEL
from models.config import LlamaConfig
from refengine.bench import bandwidth, engine_bench
from refengine.bench.report import BENCHMARKS, CpuTimes, markdown_table, stolen_note, update_section
from refengine.bench.serve_bench import DEFAULT_LOADS, SCHEDULERS, ServeBench, run as run_serve_bench
from refengine.bench.serve_workload import LENGTH_SCALE
from refengine.runtime.devices import parse_devices, parse_size


def _load(device: str, backend: str | None):
    from refengine.engine.loader import load_model
    name = backend_for_device(device, backend)
    return name, load_model(DEFAULT_MODEL, get_kernels(name, device))


@click.group()
def bench() -> None:
    """Measure the engine (medians) and record the figures in docs/BENCHMARKS.md."""


_backend = click.option("--backend", type=click.Choice(BACKENDS))


def _on_device(command: Callable) -> Callable:
    """--device and --backend, checked together before the command starts: a device this machine
    cannot run (CUDA without CuPy or a GPU) is one line, not a traceback from inside a load."""
    @functools.wraps(command)
    def checked(device: str, backend: str | None, **options):
        try:
            check_device(device, backend)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--device/--backend") from None
        return command(device=device, backend=backend, **options)
    return click.option("--device", default="cpu", show_default=True)(_backend(checked))
def _fits_context(option: str, tokens: int, context: int) -> None:
    """Refuse a size the model cannot hold before any timing: positions past its context are not
    the model's any more, and the engine would refuse such a request anyway."""
    if tokens > context:
        raise click.BadParameter(f"needs {tokens} tokens in one sequence; the model's context is {context}",
                                 param_hint=option)


_write = click.option("--write/--no-write", default=True, show_default=True, help="Update docs/BENCHMARKS.md.")
_peers = click.option("--peers", is_flag=True,
                      help="Side by side with llama.cpp and transformers (CPU) or transformers eager and CUDA "
                           "graphs (GPU), each engine in turn, median over --rounds.")
_rounds = click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1),
                       help="With --peers: rounds, engines taking turns.")
_random_weights = click.option("--random-weights", is_flag=True,
                               help="With --peers: random weights of the SmolLM2 shape (a GPU machine without "
                                    "the model package); speed does not depend on the values.")


def _weight_bytes_read(backend: str, model, batch: int) -> int:
    """Weight bytes one decode step of `batch` sequences reads: the float32 weights, or, on the
    bf16-weights backend at up to `bf16_gemv.MOST_ROWS` sequences, their bf16 copies, which cover
    every projection and the lm_head (all but the norms' few KB): half as many."""
    from kernels.bf16_gemv import MOST_ROWS
    nbytes = model.weights.nbytes()
    return nbytes // 2 if backend == BF16_WEIGHTS and batch <= MOST_ROWS else nbytes


@bench.command()
@_on_device
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1),
              help="Sequences per step [default: 1, 8, 32; with --peers 1, 8, 32, 64].")
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
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
    _fits_context("--prompt-len/--new-tokens", prompt_len + new_tokens, model.config.max_position_embeddings)
    bw = bandwidth.measure_copy_bandwidth()
    click.echo(f"copy bandwidth {bw / 1e9:.1f} GB/s; weights {loaded.model.weights.nbytes() / 1e6:.0f} MB")
    rows = []
    for batch in batches:
        result = engine_bench.measure_decode(model, batch, prompt_len, new_tokens)
        context = prompt_len + new_tokens // 2
        bound = bandwidth.decode_bound_tokens_per_s(model.config, _weight_bytes_read(name, model, batch), batch,
                                                    context, bw)
        rows.append([name, batch, prompt_len, new_tokens, f"{result.median_step_s * 1e3:.1f}",
                     f"{result.tokens_per_s:.1f}", f"{bound:.0f}", f"{100 * result.tokens_per_s / bound:.0f}%"])
        click.echo(f"{name} batch {batch:3d}: {result.tokens_per_s:8.1f} tok/s (median step "
                   f"{result.median_step_s * 1e3:.1f} ms; bandwidth bound {bound:.0f} tok/s)")
    if write:
        table = markdown_table(["backend", "batch", "prompt", "new tokens", "median step ms", "tok/s",
                                "bandwidth bound tok/s", "of bound"], rows)
        note = (f"Copy bandwidth measured in the same run: {bw / 1e9:.1f} GB/s (numpy copy, read + write). "
                f"Bound = batch × bandwidth ÷ (the weights as the step reads them + K/V of the mean "
                f"context), per step: float32, or the bf16 copies (half the bytes) where {BF16_WEIGHTS} "
                f"decodes 1-5 sequences.")
        update_section(f"decode-{name}", f"Decode, {name} backend", f"{table}\n\n{note}")


@bench.command()
@_on_device
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
    _fits_context("--length", max(lengths) + 1, loaded.model.config.max_position_embeddings)
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
    from refengine.bench import peers, side_by_side
    kind = "cuda" if device.startswith("cuda") else "cpu"
    options = side_by_side.Options(device, random_weights)
    config, weight_bytes = side_by_side.model_shape(options)
    longest = max(c[2] + options.repeats + 1 if c[0] == "decode" else c[1] + 1 for c in cases)
    _fits_context("--context" if cases[0][0] == "decode" else "--length", longest, config.max_position_embeddings)
    reason = peers.unavailable(kind)
    if reason is not None:
        raise click.UsageError(reason)
    if kind == "cuda":
        from refengine.bench.gpu_bench import copy_bandwidth
        bw = copy_bandwidth()
    else:
        bw = bandwidth.measure_copy_bandwidth()
    click.echo(f"copy bandwidth {bw / 1e9:.1f} GB/s; weights {weight_bytes / 1e6:.0f} MB")
    before = CpuTimes.read()
    by_round = side_by_side.run(cases, options, rounds, progress=click.echo)
    results = side_by_side.medians(by_round)
    steal = stolen_note(before)
    if steal:
        click.echo(steal)
    bounds = {c: bandwidth.decode_bound_tokens_per_s(config, weight_bytes, c[1], c[2] + 1, bw)
              for c in cases if c[0] == "decode"}
    mode = cases[0][0]
    table = report.decode_table(results, bounds) if mode == "decode" else report.prefill_table(results)
    click.echo(table)
    targets = report.targets_table(results, bounds, kind, by_round)
    click.echo(targets)
    if not write:
        return
    weights = "random weights of the SmolLM2-135M shape" if random_weights else "SmolLM2-135M-Instruct"
    bf16_note = (f"; {side_by_side.BF16_WEIGHTS_ENGINE} reads bf16 copies (half the weight bytes) at 1-5 "
                 "sequences, so its bound there is up to twice the column's"
                 if side_by_side.BF16_WEIGHTS_ENGINE in results else "")
    body = (f"Command: `python cli.py bench {mode} --device {device} --peers"
            f"{' --random-weights' if random_weights else ''}`; {weights}, float32 unless "
            f"named; tokens/s, median of {rounds} rounds (engines take turns, each round in a fresh process "
            f"on CPU); a target's ratio is that of the medians, and beside it the lowest and highest of "
            f"the same ratio within one round. Copy bandwidth measured in the same run: {bw / 1e9:.1f} GB/s; "
            f"bound = batch × bandwidth ÷ (float32 weights + cached K/V){bf16_note}. "
            f"{steal}\n\n{table}\n\n{targets}")
    section, place = _peers_section(kind, any(engine.endswith("AMX") for engine in results))
    if mode == "decode":
        png = BENCHMARKS.parent / f"decode_vs_batch_{section}.png"
        report.plot(results, bounds, png, f"Decode tokens/s vs batch ({place}, {weights})")
        body += f"\n\n![decode tokens/s vs batch]({png.name})"
    update_section(f"{mode}-peers-{section}", f"{mode.capitalize()} side by side ({place})", body)


def _peers_section(kind: str, ran_amx: bool) -> tuple[str, str]:
    """The side-by-side section's key and its heading's place. CPUs with AMX, with AVX-512 and with
    only AVX2 run different kernels (bf16 tiles, bf16 dot products, float32 only), so each has its
    own sections and a run on one kind never overwrites the figures of another."""
    from kernels.cpu_pool import cpu_info
    if kind != "cpu":
        return kind, kind
    if ran_amx:
        return "cpu-amx", "cpu with AMX"
    if "avx512f" not in cpu_info("flags").split():
        return "cpu-avx2", "cpu with AVX2, no AVX-512"
    return "cpu", "cpu"


@bench.command()
@_on_device
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--direct/--no-direct", default=True, show_default=True, help="O_DIRECT reads where the file system allows")
@_write
def load(device: str, backend: str | None, repeats: int, direct: bool, write: bool) -> None:
    """Prepare times; load throughput of each store tier beside this machine's limits, safetensors and the GGUF."""
    from refengine.bench.store_reports import load_report
    load_report(device, get_kernels(backend_for_device(device, backend), device), repeats, direct, write)


@bench.command()
@_on_device
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--prompt-len", default=16, show_default=True, type=click.IntRange(min=1))
@_write
def coldstart(device: str, backend: str | None, repeats: int, prompt_len: int, write: bool) -> None:
    """Cold-request time to first token: from disk or the host cache, with and without execute-while-load."""
    from refengine.bench.store_reports import coldstart_report
    from refengine.engine.loader import ensure_prepared
    config = LlamaConfig.from_json(ensure_prepared(DEFAULT_MODEL, progress=False).config)
    _fits_context("--prompt-len", prompt_len + 1, config.max_position_embeddings)
    coldstart_report(device, get_kernels(backend_for_device(device, backend), device), repeats, prompt_len, write)


@bench.command()
@_on_device
@click.option("--force", is_flag=True, help="Measure again even if a cached table exists.")
def profile(device: str, backend: str | None, force: bool) -> None:
    """Measure the scheduler's per-iteration latency table for this device (cached in the model home)."""
    from refengine.runtime.profile import device_profile
    from refengine.store.cache import model_home
    path, table = device_profile(DEFAULT_MODEL, device, backend, model_home(), force=force)
    click.echo(f"{path}")
    click.echo("prefill ms: " + ", ".join(f"{int(t)}→{l * 1e3:.1f}" for t, l in zip(table.prefill_tokens, table.prefill_latency)))
    for row in table.decode_rows:
        click.echo(f"decode ms at context {int(row.context)}: " +
                   ", ".join(f"b{int(b)}→{l * 1e3:.1f}" for b, l in zip(row.batch, row.latency)))


@bench.command("serve")
@click.option("--replicas", "models", multiple=True, type=click.IntRange(min=1), default=(8, 16), show_default=True,
              help="Models served at once: the default model and N-1 replicas of its weights (repeatable).")
@click.option("--scheduler", "schedulers", multiple=True, type=click.Choice(SCHEDULERS), default=SCHEDULERS,
              show_default=True, help="Repeatable.")
@click.option("--load", "loads", multiple=True, type=click.FloatRange(min=0, min_open=True), default=DEFAULT_LOADS,
              show_default=True, help="Offered load in requests/s (repeatable).")
@click.option("--duration", default=ServeBench.duration_s, show_default=True, type=click.FloatRange(min=1),
              help="Seconds of trace replayed per point.")
@click.option("--length-scale", default=LENGTH_SCALE, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Multiplies the trace's prompt and output lengths.")
@click.option("--devices", default="cpu", show_default=True, help="The server's devices: cpu, cpu*2, cpu,cuda:0 ...")
@_backend
@click.option("--keep-alive", default=ServeBench.keep_alive_s, show_default=True, type=click.FloatRange(min=0),
              help="The server's keep-alive, seconds.")
@click.option("--host-cache", default=ServeBench.host_cache, show_default=True,
              help="The server's host cache (0: every cold start reads the disk); written to its own section.")
@click.option("--seed", default=0, show_default=True, help="Seeds the requests' model assignment.")
@_write
def serve_bench(models: tuple[int, ...], schedulers: tuple[str, ...], loads: tuple[float, ...], duration: float,
                length_scale: float, devices: str, backend: str | None, keep_alive: float, host_cache: str,
                seed: int, write: bool) -> None:
    """Replay the Azure conversation trace against the live server: SLO-met rate, TTFT/TPOT, goodput
    and peak memory per (models, scheduler, offered load), written with a plot to docs/BENCHMARKS.md."""
    from refengine.bench import serve_report
    try:
        parse_size(host_cache)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--host-cache") from None
    try:
        for device in parse_devices(devices):
            check_device(device, backend)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--devices/--backend") from None
    config = ServeBench(tuple(models), tuple(schedulers), tuple(sorted(loads)), duration, devices=devices,
                        backend=backend, keep_alive_s=keep_alive, host_cache=host_cache, seed=seed,
                        length_scale=length_scale)
    loadavg_start, started = os.getloadavg(), time.monotonic()
    click.echo(f"{len(config.points())} points of {duration:g} s each; load average {loadavg_start[0]:.1f}")
    try:
        summaries = run_serve_bench(config, click.echo)
    except (ValueError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    if write:
        variant = ", ".join([devices] + ([f"backend {backend}"] if backend else []) +
                            ([f"host cache {host_cache}"] if host_cache != ServeBench.host_cache else []))
        slug = re.sub(r"[^a-z0-9]+", "-", variant.lower()).strip("-")
        plot_name = "bench_serve.png" if slug == "cpu" else f"bench_serve_{slug}.png"
        serve_report.plot(summaries, BENCHMARKS.parent / plot_name)
        notes = serve_report.RunNotes(" ".join(["python cli.py", *sys.argv[1:]]), time.monotonic() - started,
                                      loadavg_start, os.getloadavg(), plot_name)
        update_section(f"serve-{slug}", f"Serving a replayed trace ({variant})",
                       serve_report.section(config, summaries, notes))
        click.echo(f"wrote docs/BENCHMARKS.md (serve-{slug}) and docs/{plot_name}")


@bench.command()
@_backend
@click.option("--context", "contexts", multiple=True, type=click.IntRange(min=16), default=(128, 512, 1024),
              show_default=True, help="Prompt tokens of the request that is moved.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
@_write
def migrate(backend: str | None, contexts: tuple[int, ...], repeats: int, write: bool) -> None:
    """Pause of a running request moved to another device: live migration vs drop-and-re-prefill."""
    from refengine.bench import migrate_bench
    from refengine.store.cache import model_home
    from refengine.store.prepare import prepare
    try:
        check_device("cpu", backend)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--backend") from None
    backend = backend_for_device("cpu", backend)
    config = LlamaConfig.from_json(prepare(progress=False).config)
    _fits_context("--context", max(contexts) + migrate_bench.MAX_TOKENS, config.max_position_embeddings)
    load_before = os.getloadavg()
    runs = migrate_bench.run(model_home(), backend, contexts, repeats, progress=click.echo)
    load_after = os.getloadavg()
    body = migrate_bench.report(runs, backend, repeats, load_before, load_after)
    click.echo(body)
    if write:
        update_section("migrate", "Live migration vs drop-and-re-prefill", body)


@bench.command()
@click.option("--busy", "busy_counts", multiple=True, type=click.IntRange(min=0), default=(0, 1), show_default=True,
              help="Busy processes beside the engine, one run each.")
@click.option("--steps", "num_steps", default=200, show_default=True, type=click.IntRange(min=10),
              help="Decode steps per case, thread count and round (a quarter as many prefills).")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1))
@_write
def contention(busy_counts: tuple[int, ...], num_steps: int, rounds: int, write: bool) -> None:
    """CPU decode and prefill beside busy processes: the tuned thread count against fixed ones."""
    from refengine.bench import contention as bench_contention
    name, loaded = _load("cpu", None)
    model = loaded.model.model      # the CpuDecodeModel inside load_model's ThreadTunedModel: fixed counts run untuned
    before = CpuTimes.read()
    results = bench_contention.run(model, busy_counts, bench_contention.DEFAULT_CASES, num_steps, rounds, click.echo)
    body = bench_contention.report(results, num_steps, rounds)
    steal = stolen_note(before)
    click.echo(body + (f"\n\n{steal}" if steal else ""))
    if write:
        update_section("contention-cpu", "CPU steps beside busy processes (thread-count tuner)",
                       f"Command: `python cli.py bench contention`; {name} backend, SmolLM2-135M-Instruct. "
                       f"{body}\n\n{steal}")
