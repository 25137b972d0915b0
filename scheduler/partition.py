"""What one instance may own on a node: how many fit, and its KV where KV is not elastic.

SLINFER shares a node elastically: instances are capped only by the node's and the model's slot
counts (§3.2, §9 row 13) and KV grows and shrinks (§4.3.2). Two cases fix the KV instead: nodes
without elastic KV (the artifact's CPU slots keep `ModelSpec.fixed_kv_bytes`) and the static
partitioning of sllm+c+s, where each of the node's `cap` instances owns 1/cap of its memory and
1/cap of its time (§6.2).
"""
from __future__ import annotations

from scheduler.config import SchedulerConfig
from scheduler.specs import ModelSpec, NodeSpec


def instance_cap(model: ModelSpec, node: NodeSpec, config: SchedulerConfig) -> int:
    cap = min(node.max_instances, model.max_instances.get(node.kind, node.max_instances))
    if config.max_instances_per_node is not None:
        cap = min(cap, config.max_instances_per_node)
    return cap


def weights_bytes(model: ModelSpec, node: NodeSpec) -> int:
    """What loading the model charges: weights plus the per-instance overhead (§9 row 11), and the
    bf16 weight copies where the node keeps them. (Two instances of one model on one CPU share
    those copies; charging both errs safe.)"""
    copies = model.bf16_copy_bytes if node.bf16_copies else 0
    return model.weight_bytes + copies + node.instance_overhead_bytes


def fixed_kv_blocks(model: ModelSpec, node: NodeSpec, config: SchedulerConfig) -> int | None:
    """The instance's KV size if it never resizes, else None (elastic, SLINFER on GPUs)."""
    if not node.elastic_kv:
        return model.fixed_kv_bytes // model.block_bytes
    if config.static_partition:
        share = node.memory_bytes // instance_cap(model, node, config)
        return max(share - weights_bytes(model, node), 0) // model.block_bytes
    return None


def time_share(model: ModelSpec, node: NodeSpec, config: SchedulerConfig) -> float:
    """Fraction of wall time an instance may compute (1 unless statically partitioned)."""
    return 1.0 / instance_cap(model, node, config) if config.static_partition else 1.0
