"""What the scheduler is told at construction: the models it may serve and the nodes it may use.

These are plain, frozen descriptions, the same for every executor: the simulator describes
Llama-2-7B on an A100, the live runtime describes a 135M model on a "logical CPU device", each with
the latency table (`costmodel.py`) profiled for that pair. Nothing here changes at run time.

Invariants:
- sizes are bytes, lengths are tokens, times are seconds;
- a model's latency table is found by `(ModelSpec.profile, NodeSpec.hardware)`, so 32 replicas of
  one base model (the paper's experiments, §6.1) share one table;
- bandwidths are bytes per second *measured* by the executor at start-up (ServerlessLLM §5.1), never
  assumed by the scheduler; a node without them gets no startup estimate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

DeviceKind = Literal["cpu", "gpu"]
Tier = Literal["disk", "host"]


@dataclass(frozen=True)
class ModelSpec:
    """One servable model (a "function" of the serverless trace).

    `fixed_kv_bytes` is the KV space an instance gets on a node whose KV is not elastic (the
    artifact's CPU slots, §3.2: 16 GB for 3B, 32 GB for 7B/13B). `max_instances` caps how many
    instances of this model one node of a kind may hold (the artifact's slot counts, §3.2 and
    §9 row 13); kinds absent from the mapping are unlimited. `bf16_copy_bytes` is the bf16 copies
    of its weights (the projections, for bf16 prefill; and the lm_head, where decode reads bf16
    weights) that an instance keeps on a node with `NodeSpec.bf16_copies`.
    """

    name: str
    profile: str
    weight_bytes: int
    kv_bytes_per_token: int
    block_tokens: int = 16
    max_context: int = 4096
    fixed_kv_bytes: int = 0
    max_instances: Mapping[str, int] = field(default_factory=dict)
    bf16_copy_bytes: int = 0

    @property
    def block_bytes(self) -> int:
        return self.kv_bytes_per_token * self.block_tokens

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens of one sequence (paged KV rounds up per sequence)."""
        return -(-tokens // self.block_tokens)


@dataclass(frozen=True)
class LoadBandwidths:
    """How fast weights reach a device from each place that may hold them (ServerlessLLM §2, §5.1).

    `disk_to_host`: sequential read of the checkpoint into host memory. `host_to_device`: host
    memory to the device (pinned H2D on a GPU; `inf` where a CPU device uses the host copy in
    place). `peer_to_device`: from another device of the same kind already holding the model
    (λScale's GPU-to-GPU multicast); None where the executor cannot load that way.
    """

    disk_to_host: float
    host_to_device: float
    peer_to_device: float | None = None


@dataclass(frozen=True)
class NodeSpec:
    """One device the scheduler may place instances on (§3.1 "unified hardware abstraction").

    `memory_bytes` is what the scheduler may hand out (weights + KV + per-instance overhead).
    `elastic_kv` says whether instances resize their KV here (GPUs in the paper, §4.3.2) or keep
    `ModelSpec.fixed_kv_bytes` (the artifact's CPUs). `instance_overhead_bytes` is charged with the
    weights of every instance (the artifact's 1.5 GB CUDA context per slot, §9 row 11).
    `bf16_copies`: instances here also keep `ModelSpec.bf16_copy_bytes` (a CPU whose prefill
    GEMMs run bf16, `kernels.bf16`, or whose decode reads bf16 weights), charged with the weights too.
    `host` names the machine whose disk and host-memory cache feed the node (devices of one server
    share them; None: the node is its own machine); `bandwidths` are that path's measured speeds.
    """

    node_id: str
    kind: DeviceKind
    hardware: str
    memory_bytes: int
    elastic_kv: bool = True
    instance_overhead_bytes: int = 0
    bf16_copies: bool = False
    max_instances: int = 8
    host: str | None = None
    bandwidths: LoadBandwidths | None = None

    @property
    def host_id(self) -> str:
        return self.host if self.host is not None else self.node_id
