"""The simulated testbed of SLINFER §6.1: models, nodes and the cost of memory actions.

Constants come from the artifact (digest §3.2): 78 GB per A100 with a 1.5 GB context per instance,
256 GB per Xeon node with fixed per-instance KV, per-model weights / KV bytes per token / slot
counts. Memory-action costs are the simulator's own model: weights load at ≈12.6 GB/s (≈1 s for 7B
with the ServerlessLLM loader, §8 item 11); a KV resize allocates, copies the *used* blocks and
frees (Fig. 16), so it costs a fixed 50 ms plus time proportional to the bytes copied, calibrated
on Fig. 17 with a full cache (grow 32 → 64 GB copies 32 GB in 1.9 s; shrink 32 → 16 GB copies
16 GB in 0.3 s). A fresh allocation or a release to 0 copies nothing. CPU instances bind for free
(models resident in CPU memory, §9 row 8) and keep fixed KV.
"""
from __future__ import annotations

from dataclasses import dataclass

from scheduler import ModelSpec, NodeSpec

GiB = 1 << 30
KiB = 1 << 10

# size → (profile, weight GiB, KV KiB per token, fixed CPU KV GiB, slots per GPU, slots per CPU)
MODEL_SIZES: dict[str, tuple[str, float, int, int, int, int]] = {
    "3b": ("llama-3.2-3b", 6.1, 112, 16, 8, 4),
    "7b": ("llama-2-7b", 12.6, 512, 32, 4, 2),
    "8b": ("llama-3.1-8b", 22.0, 128, 32, 4, 2),
    "13b": ("llama-2-13b", 24.3, 800, 32, 2, 1),
}

GPU_HARDWARE = "a100-80gb"
CPU_HARDWARE = "xeon-6462c"


def model_spec(name: str, size: str) -> ModelSpec:
    try:
        profile, weights, kv_kib, cpu_kv, gpu_slots, cpu_slots = MODEL_SIZES[size]
    except KeyError:
        raise ValueError(f"unknown model size {size!r}; choose from {sorted(MODEL_SIZES)}") \
            from None
    return ModelSpec(name=name, profile=profile, weight_bytes=int(weights * GiB),
                     kv_bytes_per_token=kv_kib * KiB, block_tokens=16, max_context=4096,
                     fixed_kv_bytes=cpu_kv * GiB,
                     max_instances={"gpu": gpu_slots, "cpu": cpu_slots})


def nodes(cpus: int = 4, gpus: int = 4) -> list[NodeSpec]:
    """`cpus` Xeon 6462C nodes then `gpus` A100-80GB nodes (paper default: 4 + 4)."""
    cpu = [NodeSpec(f"cpu{i}", "cpu", CPU_HARDWARE, 256 * GiB, elastic_kv=False, max_instances=4)
           for i in range(cpus)]
    gpu = [NodeSpec(f"gpu{i}", "gpu", GPU_HARDWARE, 78 * GiB, elastic_kv=True,
                    instance_overhead_bytes=int(1.5 * GiB), max_instances=8)
           for i in range(gpus)]
    return cpu + gpu


@dataclass(frozen=True)
class MemoryCosts:
    """Seconds a memory action takes on a device kind (simulator only)."""

    load_gib_per_s: float = 12.6
    unload_s: float = 0.1
    resize_fixed_s: float = 0.05
    grow_s_per_gib_copied: float = 1.9 / 32
    shrink_s_per_gib_copied: float = 0.3 / 16

    def load(self, kind: str, nbytes: int) -> float:
        return nbytes / GiB / self.load_gib_per_s if kind == "gpu" else 0.0

    def unload(self, kind: str) -> float:
        return self.unload_s if kind == "gpu" else 0.0

    def resize(self, kind: str, from_bytes: int, to_bytes: int, used_bytes: int) -> float:
        """Allocate `to_bytes`, copy the used blocks that fit, free `from_bytes` (Fig. 16)."""
        if kind != "gpu":
            return 0.0
        copied = min(used_bytes, to_bytes) / GiB
        rate = self.grow_s_per_gib_copied if to_bytes > from_bytes else self.shrink_s_per_gib_copied
        return self.resize_fixed_s + copied * rate
