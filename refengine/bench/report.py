"""Benchmark figures into docs/BENCHMARKS.md: each command owns one marked section and rewrites it,
so re-running a benchmark replaces its old rows instead of appending stale ones.

Each section names the machine, and the notes say how loaded it was: on a shared VM the share of
CPU time the hypervisor stole during the run (`stolen_note`) explains figures that swing 3x
between runs of the same code."""
from __future__ import annotations

import datetime
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "docs" / "BENCHMARKS.md"


def machine_description() -> str:
    from kernels.cpu_pool import cpu_info
    cpu = cpu_info("model name") or platform.processor() or "unknown CPU"
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / (1 << 20):.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}{_gpu_description()}"


@dataclass(frozen=True)
class CpuTimes:
    """Jiffies all CPUs spent busy, and that a hypervisor took for other guests while this one
    wanted to run ("steal", /proc/stat's eighth column)."""

    busy: int
    stolen: int

    @classmethod
    def read(cls, stat: Path = Path("/proc/stat")) -> "CpuTimes | None":
        """Now, or None where /proc/stat is missing or has no steal column (not Linux, old kernel)."""
        try:
            fields = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        if len(fields) < 8:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        return cls(user + nice + system + irq + softirq, steal)


def stolen_percent(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
    """Of the CPU time the machine wanted between two readings, the share a hypervisor gave to
    other guests. On a shared VM this is why figures of the same code swing between runs: above a
    few percent they are low and noisy, and only ratios measured side by side mean much."""
    if before is None or after is None:
        return None
    stolen, busy = after.stolen - before.stolen, after.busy - before.busy
    return 100.0 * stolen / (stolen + busy) if stolen + busy > 0 else 0.0


def stolen_note(before: CpuTimes | None) -> str:
    """A sentence for a benchmark's notes on the CPU time stolen since `before` ("" where unknown)."""
    stolen = stolen_percent(before, CpuTimes.read())
    if stolen is None:
        return ""
    warning = " (a shared VM under load: figures are low and noisy; same-run ratios hold best)" if stolen >= 5 else ""
    return f"CPU time stolen by the hypervisor during the run: {stolen:.0f}% of what the machine asked for{warning}."


def _gpu_description() -> str:
    """", GPU: <name>" when CuPy sees a GPU (imported only if already loaded: a CPU run stays CPU-only)."""
    import sys
    if "cupy" not in sys.modules:
        return ""
    try:
        cupy = sys.modules["cupy"]
        return f", GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}"
    except Exception:  # no usable device: describe the host only
        return ""


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def update_section(name: str, title: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the section `name` of the benchmarks file."""
    begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
    stamp = datetime.date.today().isoformat()
    section = f"{begin}\n## {title}\n\nMeasured {stamp} on {machine_description()}.\n\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery figure is a median; the machine is noted per section.\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
