"""Per-iteration latency tables measured on the real kernels, for the scheduler's cost model.

SLINFER predicts with nothing but profiled iteration latencies (§4.2.2): prefill latency by tokens,
decode latency by (batch, average context). This module measures them on an `Instance` of the real
model, in the `refengine.latency/1` format `scheduler/costmodel.py` reads, and caches the file in
`<home>/profiles/` so a server restart does not measure again.

Decode points need a batch of long contexts; prefilling them first would dominate the run, so the
profiler plants sequences that already "hold" their context (blocks reserved, contents arbitrary):
a decode iteration's cost depends on the lengths, not on the values in the cache.

A shared machine stalls now and then (another process, a hypervisor giving the CPU to another
guest: 30% of it on one VM here), and one stalled point is enough to make the scheduler refuse
every request: a batch-1 decode step profiled at 260 ms instead of ~50 failed the 250 ms TPOT SLO,
so `serve` answered each request with 429. So each point is the median of REPEATS steps, and the
table is made `stall_free` before it is used.

`warm_up` runs the same kinds of step once, for `serve` to call at start-up whether its table was
cached or not: it is what compiles the kernels, or loads them from Numba's cache, before a request
waits for it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
import numpy as np
from tqdm import tqdm

from kernels import backend_for_device, get_kernels
from models.llama import LlamaModel
from refengine.engine.instance import Instance
from refengine.engine.loader import ensure_prepared, load_llama, with_fast_decode
from refengine.engine.sequence import SamplingParams, SequenceStatus
from refengine.engine.step_result import StepKind
from refengine.runtime.devices import DeviceSpec
from scheduler.costmodel import FORMAT, LatencyTable, profile_filename

log = logging.getLogger("refengine.profile")

# Powers of two up to what a 135M model on a 2-core CPU serves within SLO; the cost model extrapolates
# proportionally beyond the last point (§4.2.2).
FULL_GRID = {"prefill": (16, 64, 256, 1024), "batch": (1, 4, 16, 32), "context": (128, 512, 1024)}
QUICK_GRID = {"prefill": (16, 128), "batch": (1, 4), "context": (64, 256)}
REPEATS = 5


def _source(repeats: int) -> str:
    """How a table was made, recorded in its file."""
    return (f"refengine bench profile: medians of {repeats} iterations per point, stall-free, "
            f"small decode steps as served (one region or CUDA graphs)")


SOURCE = _source(REPEATS)   # a cached table made another way is measured again


def stall_free(latencies) -> np.ndarray:
    """Each point capped by every point of at least as much work (along each axis, the minimum of
    itself and all later points): more prompt tokens, a larger batch or a longer context never make
    a step faster, while a stall only adds time, so a point above a larger one was stalled and the
    larger one bounds it. Points in order, workload growing along every axis."""
    out = np.asarray(latencies, dtype=float)
    for axis in range(out.ndim):
        out = np.flip(np.minimum.accumulate(np.flip(out, axis), axis=axis), axis)
    return out


def _median_step(instance: Instance, kind: StepKind, repeats: int) -> float:
    return statistics.median(instance.step(kind).elapsed_s for _ in range(repeats))


def _prefill_latency(model: LlamaModel, tokens: int, repeats: int) -> float:
    rng = np.random.default_rng(tokens)
    times = []
    for _ in range(repeats):
        instance = Instance(model, num_blocks=-(-(tokens + 1) // 16), max_prefill_tokens=tokens)
        instance.add_request(rng.integers(100, model.config.vocab_size, tokens).tolist(),
                             SamplingParams(max_tokens=1, ignore_eos=True))
        times.append(instance.step(StepKind.PREFILL).elapsed_s)
    return statistics.median(times)


def _decode_latency(model: LlamaModel, batch: int, context: int, repeats: int) -> float:
    per_seq = -(-(context + repeats + 1) // 16)
    instance = Instance(model, num_blocks=batch * per_seq, max_running=batch)
    for b in range(batch):
        seq = instance.add_request([100 + b % 7] * context, SamplingParams(max_tokens=repeats + 2, ignore_eos=True))
        instance.kv.reserve(seq, context)
        seq.num_cached_tokens = context - 1        # as if prefilled: only the newest token is uncached
        instance.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        instance.running.append(seq)
    instance.step(StepKind.DECODE)                 # warm-up
    return _median_step(instance, StepKind.DECODE, repeats)


def measure_table(model: LlamaModel, profile: str, hardware: str, grid: dict = FULL_GRID,
                  repeats: int = REPEATS, progress: bool = True) -> LatencyTable:
    """Measure prefill and decode latencies over `grid` into a LatencyTable (stall-free)."""
    points = len(grid["prefill"]) + len(grid["batch"]) * len(grid["context"])
    with tqdm(total=points, desc=f"profiling {profile} on {hardware}", unit="point", disable=not progress) as bar:
        prefill = []
        for tokens in grid["prefill"]:
            prefill.append(_prefill_latency(model, tokens, repeats) * 1e3)
            bar.update()
        decode = []
        for context in grid["context"]:
            decode.append([])
            for batch in grid["batch"]:
                decode[-1].append(_decode_latency(model, batch, context, repeats) * 1e3)
                bar.update()
    capped_prefill, capped_decode = stall_free(prefill), stall_free(decode)
    stalled = int((capped_prefill < prefill).sum() + (capped_decode < np.asarray(decode)).sum())
    if stalled:
        log.info("%s on %s: %d of %d points stalled (slower than a larger workload) and were capped",
                 profile, hardware, stalled, points)
    rows = [{"context": context, "batch": list(grid["batch"]), "latency": latencies.tolist()}
            for context, latencies in zip(grid["context"], capped_decode)]
    return LatencyTable.from_dict({
        "format": FORMAT, "profile": profile, "hardware": hardware, "unit": "ms", "source": _source(repeats),
        "prefill": {"tokens": list(grid["prefill"]), "latency": capped_prefill.tolist()}, "decode": rows})


# What `warm_up` runs: a prompt below and one above the CPU's bf16 threshold (`CpuKernels.bf16_min_tokens`),
# decode of one sequence (the one-region step / a CUDA graph) and of more than that path takes (op by op)
WARM_UP_PREFILLS = (16, 128)
WARM_UP_BATCHES = (1, 8)


def warm_up(model: LlamaModel) -> float:
    """Run each kind of step serving runs, once, and return the seconds it took. Serving calls it at
    start-up, so that the first request does not pay for compiling the kernels (a cold Numba cache:
    ~50 s on the Zen 3 VM) or loading them from the cache (~0.3 s)."""
    started = time.perf_counter()
    for tokens in WARM_UP_PREFILLS:
        _prefill_latency(model, tokens, repeats=1)
    for batch in WARM_UP_BATCHES:
        _decode_latency(model, batch, context=16, repeats=1)
    return time.perf_counter() - started


def machine_of(device: str) -> str:
    """What a table's latencies depend on besides the weights: the GPU's name, or the CPU's model and
    core count, and the kernels that ran (`kernels_fingerprint`). A model cache may be shared by
    several machines (or moved), and outlives upgrades, so a table is kept with the machine and
    kernels it was measured on and measured again under any others."""
    if device.startswith("cuda"):
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(int(device.partition(":")[2] or 0))["name"].decode()
        return f"{name}; {kernels_fingerprint('cuda')}"
    from kernels.cpu_pool import cpu_info
    model = cpu_info("model name") or platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores; {kernels_fingerprint('cpu')}"


def kernels_fingerprint(kind: str) -> str:
    """A digest of the kernel sources, plus, on a CPU, which GEMM libraries they call: a table
    measured before a kernel changed (a 2x faster prefill, say) would mislead the scheduler."""
    import kernels
    digest = hashlib.sha256()
    root = Path(kernels.__file__).parent
    for path in sorted([*root.glob("*.py"), *root.glob("cuda/*.cu")]):
        digest.update(path.read_bytes())
    label = f"kernels {digest.hexdigest()[:12]}"
    if kind == "cpu":
        from kernels import cpu_pool
        from kernels.bf16 import Bf16Matmul
        bf16 = Bf16Matmul.create(required=False)
        label += (", MKL sgemm" if cpu_pool.MKL_SGEMM is not None else ", OpenBLAS sgemm") + \
                 (f", {bf16.unit} bf16" if bf16 is not None else "")
    return label


def cached_table(load_model: Callable[[], LlamaModel], profile: str, hardware: str, directory: Path,
                 machine: str, grid: dict = FULL_GRID, progress: bool = True) -> LatencyTable:
    """The table from `directory` if it was measured on `machine` the current way (`SOURCE`) or
    names no machine (written by hand, e.g. pinned for a test), else measure it now on
    `load_model()` and save it (replacing one from another machine or method, or one that cannot
    be read)."""
    path = directory / profile_filename(profile, hardware)
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            if "machine" not in saved or (saved["machine"] == machine and saved.get("source") == SOURCE):
                return LatencyTable.from_dict(saved)
            log.info("%s was measured on %s (%s), not here (%s; %s): measuring again", path,
                     saved.get("machine"), saved.get("source"), machine, SOURCE)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("cannot read %s (%s): measuring again", path, e)
    table = measure_table(load_model(), profile, hardware, grid, progress=progress)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**table.to_dict(), "machine": machine}, indent=1))
    tmp.replace(path)
    return table


def device_profile(weights: str, device: str, backend: str | None, home: Path, grid: dict = FULL_GRID,
                   force: bool = False) -> tuple[Path, LatencyTable]:
    """The cached table of `weights` on `device` (kernels: `backend`, default the device's own), measured
    now if missing or `force`d. The model is loaded only to measure, so a cache hit costs a file read;
    a benchmark calls this once before it starts servers, which then all find the table."""
    name = backend_for_device(device, backend)
    hardware = f"{DeviceSpec(device, 0).kind}-{name}"
    directory = home / "profiles"
    path = directory / profile_filename(weights, hardware)
    if force:
        path.unlink(missing_ok=True)
    # the model as serving runs it (`with_fast_decode`), minus the thread tuner: its tries of other
    # counts would land in the medians, and on the quiet machine it keeps every thread anyway
    return path, cached_table(lambda: with_fast_decode(load_llama(ensure_prepared(weights, home),
                                                                  get_kernels(name, device)), tune_threads=False),
                              weights, hardware, directory, machine_of(device), grid)
