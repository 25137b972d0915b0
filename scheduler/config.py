"""One configuration for SLINFER, its baselines and its ablations (§6.2, §6.4).

Baselines are presets of this dataclass, not copies of the scheduler: ServerlessLLM ("sllm") is
GPU-only, one instance per node, admission by a hand-tuned concurrency limit and round-robin over a
model's instances; "sllm+c" adds CPU nodes, CPU first; "sllm+c+s" allows two instances per node,
each with a static half of the memory and half of the time. New baseline instances use the same
node order as SLINFER (most loaded first, empty nodes last: the artifact's default sort, which
every system shares). The ablations switch off one SLINFER mechanism each.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal, Mapping

from scheduler.slo import SloPolicy

Order = Literal["pack", "balance", "round_robin"]

# Concurrency limit per instance before scale-out, hand-tuned by the paper's authors (§6.2).
# Llama-3.1-8B has no published limit; it takes Llama-2-7B's (same class of model).
_SLLM_GPU = {"llama-3.2-3b": 160, "llama-2-7b": 32, "llama-3.1-8b": 32, "llama-2-13b": 16}
_SLLM_C_CPU = {"llama-3.2-3b": 59, "llama-2-7b": 15, "llama-3.1-8b": 15, "llama-2-13b": 6}
_SLLM_S_GPU = {"llama-3.2-3b": 71, "llama-2-7b": 12, "llama-3.1-8b": 12, "llama-2-13b": 4}
_SLLM_S_CPU = {"llama-3.2-3b": 23, "llama-2-7b": 4, "llama-3.1-8b": 4, "llama-2-13b": 6}


def _limits(cpu: Mapping[str, int], gpu: Mapping[str, int]) -> dict[str, dict[str, int]]:
    return {p: {"cpu": cpu.get(p, 0), "gpu": gpu[p]} for p in gpu}


@dataclass(frozen=True)
class SchedulerConfig:
    """Every policy knob, with SLINFER's (artifact) defaults.

    - `pools`: device kinds new instances may use, in priority order (CPU first, §4.1 step 3).
    - `max_instances_per_node`: sharing cap on top of the node's and model's own caps (1 = no
      sharing, the "w/o Sharing" ablation and sllm).
    - `admission`: "shadow" validation (§4.2.4) or a per-instance "concurrency" limit (baselines).
    - `static_partition`: each instance owns 1/cap of its node's memory and time (sllm+c+s).
    - `instance_order`/`node_order`: "pack" is bin-packing (largest batch / most loaded first,
      §4.4.2), "balance" the reverse, "round_robin" the sllm rotation.
    - `preemption`: proactive consolidation (§4.4.1).
    - `shadow`: "edf" (the artifact's check) or "full" (event simulation of the node, §9 row 3).
    - `estimate_margin`: multiplies every latency estimate (artifact: 1.05 GPU, 1.1 CPU, §4.2.2).
    - `kv_estimate`: "pad" (current length + `kv_pad_tokens`, artifact) or "eq2" (§4.3.1).
    - `grant_target`: a GPU decode grant holds ≈ grant_target / iteration time steps (§9 row 5).
    - `startup_aware`: a new instance goes to the passing node of the pool with the earliest
      estimated start-up (ServerlessLLM §5.1); start-ups within `startup_tolerance` s of the
      earliest count as equal, and the bin-packing order decides among them (`placement.py`).
    - `migration`: a GPU preemption victim's requests move live to warm instances of their model
      where that costs less than drop-and-re-prefill (`migration.py`); needs an executor that
      carries out `Migrate` and `HandOver`. `migration_compute_victims`: CPU victims too (they
      keep their decode time while draining, as GPU ones keep their memory);
      `migration_cold_destinations`: also to an instance still loading, or to a new one started
      for the move on another node (ServerlessLLM loads the destination first). A rebuild takes
      up to `migration_rounds` rounds, the next rebuilding the tokens the source made during the
      last, until at most `migration_gap` are left for the hand-over to catch up (ServerlessLLM's
      multi-round migration; its default gap is 20 tokens).
    """

    name: str = "slinfer"
    pools: tuple[str, ...] = ("cpu", "gpu")
    max_instances_per_node: int | None = None
    admission: Literal["shadow", "concurrency"] = "shadow"
    concurrency_limits: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    static_partition: bool = False
    instance_order: Order = "pack"
    node_order: Order = "pack"
    preemption: bool = True
    slo: SloPolicy = SloPolicy(margin=0.05)
    estimate_margin: Mapping[str, float] = field(default_factory=lambda: {"cpu": 1.1, "gpu": 1.05})
    shadow: Literal["edf", "full"] = "edf"
    shadow_horizon: float = 2.0
    watermark: float = 0.25
    kv_estimate: Literal["pad", "eq2"] = "pad"
    kv_pad_tokens: int = 512
    output_prior: float = 220.0
    keep_alive: float = 1.0
    retry_interval: float = 0.25
    grant_target: float = 0.05
    startup_aware: bool = True
    startup_tolerance: float = 0.1
    migration: bool = False
    migration_compute_victims: bool = False
    migration_cold_destinations: bool = False
    migration_rounds: int = 1
    migration_gap: int = 4

    def concurrency_limit(self, profile: str, kind: str) -> int:
        try:
            return self.concurrency_limits[profile][kind]
        except KeyError:
            raise KeyError(f"{self.name}: no concurrency limit for {profile!r} on {kind}") from None


SLINFER = SchedulerConfig()
SLLM = SchedulerConfig(
    name="sllm", pools=("gpu",), max_instances_per_node=1, admission="concurrency",
    concurrency_limits=_limits({}, _SLLM_GPU), static_partition=True,
    instance_order="round_robin", node_order="pack", preemption=False)
SLLM_C = replace(SLLM, name="sllm+c", pools=("cpu", "gpu"),
                 concurrency_limits=_limits(_SLLM_C_CPU, _SLLM_GPU))
SLLM_C_S = replace(SLLM_C, name="sllm+c+s", max_instances_per_node=2,
                   concurrency_limits=_limits(_SLLM_S_CPU, _SLLM_S_GPU))

PRESETS: dict[str, SchedulerConfig] = {c.name: c for c in (
    SLINFER, SLLM, SLLM_C, SLLM_C_S,
    replace(SLINFER, name="slinfer-no-cpu", pools=("gpu",)),
    replace(SLINFER, name="slinfer-no-sharing", max_instances_per_node=1),
    replace(SLINFER, name="slinfer-no-consolidation", instance_order="balance",
            node_order="balance", preemption=False),
)}

# Live migration as `serve` runs it (`refengine/runtime/options.py`) and the simulator can compare:
# from any victim, to a new instance if need be, in up to 8 rounds.
LIVE_MIGRATION: Mapping[str, object] = MappingProxyType({
    "migration": True, "migration_compute_victims": True, "migration_cold_destinations": True,
    "migration_rounds": 8})


def preset(name: str, **overrides) -> SchedulerConfig:
    """A named preset (see `PRESETS`), with fields overridden."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown scheduler preset {name!r}; choose from {sorted(PRESETS)}") \
            from None
    return replace(base, **overrides) if overrides else base
