"""`bench load` and `bench coldstart`: how fast the model store delivers a model and a cold request
gets its first token (issue 7), printed and written to docs/BENCHMARKS.md. The cases they time are
`refengine.bench.load_bench` and `refengine.bench.coldstart`."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import click

from kernels.interface import Kernels
from refengine.bench import coldstart as cs
from refengine.bench import load_bench as lb
from refengine.bench.report import CpuTimes, markdown_table, stolen_note, update_section
from refengine.engine.loader import load_llama
from refengine.store.chunked_read import FileReader
from refengine.store.model_store import READ_THREADS, ModelStore
from refengine.store.packed import CHUNK_BYTES, verify_packed
from refengine.store.prepare import DEFAULT_MODEL as WEIGHTS
from refengine.store.prepare import SOURCES, prepare


def bench_store(device: str, budget: int, direct: bool = True) -> ModelStore:
    """A model store for benchmarks: pinned host memory when the models go to a GPU."""
    if device.startswith("cuda"):
        from refengine.store.cuda_upload import pinned_empty
        return ModelStore(host_budget=budget, direct=direct, allocate=pinned_empty)
    return ModelStore(host_budget=budget, direct=direct)


def load_report(device: str, kernels: Kernels, repeats: int, direct: bool, write: bool) -> None:
    """Prepare times; load throughput of each store tier beside this machine's limits, safetensors and the GGUF."""
    gpu = device.startswith("cuda")
    prepare_rows = []
    before = CpuTimes.read()
    with tempfile.TemporaryDirectory() as home, SOURCES[WEIGHTS].path() as gguf:
        def timed_prepare(label: str) -> None:
            started = time.perf_counter()
            prepare(WEIGHTS, home=Path(home), progress=False)
            prepare_rows.append([label, f"{time.perf_counter() - started:.2f}"])

        timed_prepare("prepare (cold: GGUF → safetensors + checkpoint)")
        files = prepare(WEIGHTS, home=Path(home), progress=False)
        files.packed.unlink()
        timed_prepare("prepare (checkpoint missing: rebuilt from the safetensors, no conversion)")
        timed_prepare("prepare (already prepared; the first run checks the chunk checksums)")
        timed_prepare("prepare (already prepared, checksums vouched for by the marker)")
        verify_packed(files)
        nbytes = files.packed.stat().st_size
        store = bench_store(device, 2 * nbytes, direct)
        disk_cases = lb.sequential_read_cases(files.packed)
        cases = {**disk_cases, "store: disk": lb.store_disk_case(store, files, kernels, device),
                 "safetensors": lb.safetensors_case(files, kernels), "gguf": lb.gguf_case(gguf, files, kernels),
                 "host limit": lb.pinned_h2d_case(nbytes, device) if gpu else lb.memcpy_case(nbytes),
                 "store: host": lb.store_host_case(store, files, kernels, device)}
        seconds = lb.medians(cases, repeats)
        gguf_mb = gguf.stat().st_size / 1e6
        with FileReader(files.packed, direct=direct) as reader:
            direct = reader.direct           # what the file system granted
        store.close()
    disk_limit = min(seconds[name] for name in disk_cases)
    safetensors = seconds["safetensors"]

    def row(what: str, name: str, of_limit: str = "", compare: bool = False) -> list[str]:
        s = seconds[name]
        return [what, f"{s:.3f}", f"{nbytes / s / 1e9:.2f}", of_limit, f"{safetensors / s:.1f}×" if compare else ""]

    def percent(name: str, limit: float) -> str:
        return f"{100 * limit / seconds[name]:.0f}%"

    rows = [row(f"disk limit: sequential read of the same file ({name})", name) for name in disk_cases]
    rows += [row("store: disk → host → model (O_DIRECT, checksums vouched for)" if direct else
                 "store: disk → host → model (buffered reads)", "store: disk", percent("store: disk", disk_limit),
                 compare=True),
             row("safetensors: safe_open + get_tensor per tensor + stacking", "safetensors",
                 percent("safetensors", disk_limit), compare=True),
             row(f"GGUF ({gguf_mb:.0f} MB Q4_1): reader + dequantize + stacking", "gguf", compare=True),
             row("device limit: pinned host→device copy" if gpu else "host limit: memcpy of the same bytes",
                 "host limit")]
    rows.append(row("store: host cache → model (chunked pinned H2D copies)", "store: host",
                    percent("store: host", seconds["host limit"])) if gpu else
                row("store: host cache → model (views of the cached bytes)", "store: host", "no copy needed"))
    for what, value in prepare_rows:
        click.echo(f"{what}: {value} s")
    for r in rows:
        click.echo(f"{r[0]}: {r[1]} s, {r[2]} GB/s {r[3]} {r[4]}")
    if write:
        header = [f"load (median of {repeats}, cases interleaved)", "seconds", "GB/s", "of the tier's limit",
                  "vs safetensors"]
        note = (f"{nbytes / 1e6:.0f} MB of float32 weights (the GGUF row delivers the same weights from the Q4_1 "
                f"file); backend `{kernels.name}`; {READ_THREADS} reader threads, {CHUNK_BYTES >> 20} MiB chunks. "
                "GB/s is the float32 bytes over the time. The page cache is dropped before every disk row with "
                "`posix_fadvise(POSIX_FADV_DONTNEED)` on the file about to be read (`fincore` shows no page of it "
                "resident after the call; `/proc/sys/vm/drop_caches` would also work as root but drops every "
                "other process's cache too). "
                f"Load average at the end of the run: {lb.load_average()}. {stolen_note(before)}")
        body = "\n\n".join([markdown_table(["what", "seconds"], prepare_rows), markdown_table(header, rows), note])
        update_section(f"load-{device.partition(':')[0]}", f"Model store: prepare and load ({device})", body)


def coldstart_report(device: str, kernels: Kernels, repeats: int, prompt_len: int, write: bool) -> None:
    """Cold-request time to first token: from disk or the host cache, with and without execute-while-load."""
    prompt = list(range(100, 100 + prompt_len))
    before = CpuTimes.read()
    with tempfile.TemporaryDirectory() as home:
        files = prepare(WEIGHTS, home=Path(home), progress=False)
        resident = load_llama(files, kernels)
        cs.first_token(resident, prompt)                     # compile the kernels before timing anything
        store = bench_store(device, 2 * files.packed.stat().st_size)
        cases = {("model already loaded (prefill only)", "–"): cs.resident_case(resident, prompt),
                 ("disk: safetensors (safe_open) + stacking", "no"): cs.safetensors_case(files, kernels, prompt)}
        after_load: dict[tuple[str, str], list[float]] = {}
        for from_host in (False, True):
            for overlap in (False, True):
                case = ("host cache" if from_host else "disk: store (checkpoint)", "yes" if overlap else "no")
                after_load[case] = []
                cases[case] = cs.store_case(store, files, kernels, device, prompt, overlap, from_host, after_load[case])
        ttft = lb.medians(cases, repeats)
        store.close()
    floor = next(iter(ttft.values()))

    def after_load_ms(case: tuple[str, str]) -> str:
        return f"{statistics.median(after_load[case]) * 1e3:.0f}" if case in after_load else ""

    table = [[what, overlap, f"{s * 1e3:.0f}", f"{(s - floor) * 1e3:.0f}", after_load_ms((what, overlap))]
             for (what, overlap), s in ttft.items()]
    for row in table:
        click.echo(f"{row[0]} (execute-while-load {row[1]}): TTFT {row[2]} ms, {row[3]} ms above prefill alone"
                   + (f", first token {row[4]} ms after the last weight was resident" if row[4] else ""))
    if write:
        header = [f"weights from (median of {repeats}, cases interleaved)", "execute-while-load", "TTFT ms",
                  "ms above prefill alone",
                  "first token, ms after the last weight was resident"]
        body = (markdown_table(header, table)
                + f"\n\nA {prompt_len}-token prompt, one prefill step, backend `{kernels.name}`; disk rows start "
                  "from a dropped page cache (`posix_fadvise(DONTNEED)`) and an empty host cache. "
                  f"Load average at the end of the run: {lb.load_average()}. {stolen_note(before)}")
        update_section(f"coldstart-{device.partition(':')[0]}", f"Cold-start time to first token ({device})", body)
