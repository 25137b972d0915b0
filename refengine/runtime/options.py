"""How a live runtime is set up: devices, keep-alive, which scheduler, and its configuration."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from models.catalogue import Catalogue
from refengine.runtime.devices import DeviceSpec
from refengine.runtime.profile import FULL_GRID
from scheduler.config import LIVE_MIGRATION, SchedulerConfig, preset
from scheduler.slo import SloPolicy


@dataclass
class RuntimeOptions:
    catalogue: Catalogue
    devices: list[DeviceSpec] = field(default_factory=lambda: [DeviceSpec("cpu:0", 8 << 30)])
    keep_alive_s: float = 1.0
    scheduler: str = "slinfer"            # or "exclusive": one dedicated instance per model, no sharing
    backend: str | None = None            # kernel backend override (default: each device's own)
    home: Path | None = None              # model cache (default $REFENGINE_HOME)
    host_cache_bytes: int = 4 << 30       # the model store's host-memory tier (0: none)
    profile_grid: dict = field(default_factory=lambda: FULL_GRID)
    slo: SloPolicy | None = None           # None = SLINFER's defaults (§6.1) with the artifact's 5% margin
    migration: bool = True                # preemption live-migrates running requests where cheaper,
                                          # from any device, to a new instance if need be


def scheduler_config(name: str, keep_alive_s: float, weights: set[str], slo: SloPolicy | None,
                     migration: bool = True) -> SchedulerConfig:
    """`slinfer`, or `exclusive`: ServerlessLLM-style one instance per node, FCFS up to a
    concurrency limit, CPU first (the sllm+c preset with limits for our models). With `migration`,
    a preemption moves requests live from any device, to a new instance if need be, in rounds."""
    overrides = {"keep_alive": keep_alive_s, **(LIVE_MIGRATION if migration else {}), **({"slo": slo} if slo else {})}
    if name == "slinfer":
        return preset("slinfer", **overrides)
    if name == "exclusive":
        limits = {w: {"cpu": 8, "gpu": 32} for w in weights}
        return preset("sllm+c", concurrency_limits=limits, **overrides)
    raise ValueError(f"unknown scheduler {name!r}; choose slinfer or exclusive")
