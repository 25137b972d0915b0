"""Small, exact builders for scheduler tests: a latency table of round numbers, tiny models."""
from __future__ import annotations

from scheduler import (CostModel, LatencyTable, LoadBandwidths, ModelSpec, NodeSpec, Scheduler,
                       SchedulerConfig)
from scheduler.costmodel import DecodeRow
from scheduler.slo import SloPolicy
from scheduler.state import Instance, Node, Request

# prefill: 1 ms per token; decode: 50 ms + 20 ms per sequence, whatever the context.
TABLE = LatencyTable(
    "tiny", "dev", (1.0, 4096.0), (0.001, 4.096),
    (DecodeRow(512.0, (1.0, 256.0), (0.07, 0.05 + 0.02 * 256)),
     DecodeRow(4096.0, (1.0, 256.0), (0.07, 0.05 + 0.02 * 256))))
COST = CostModel([TABLE])
EXACT = SchedulerConfig(slo=SloPolicy(), estimate_margin={"cpu": 1.0, "gpu": 1.0})


def model(name: str = "m", weight: int = 10, kv_per_token: int = 1, fixed_kv: int = 0,
          max_context: int = 64) -> ModelSpec:
    return ModelSpec(name, "tiny", weight, kv_per_token, block_tokens=16, max_context=max_context,
                     fixed_kv_bytes=fixed_kv)


def node_spec(node_id: str = "g0", kind: str = "gpu", memory: int = 10_000,
              elastic: bool = True, host: str | None = None,
              bandwidths: LoadBandwidths | None = None) -> NodeSpec:
    return NodeSpec(node_id, kind, "dev", memory, elastic_kv=elastic, max_instances=8, host=host,
                    bandwidths=bandwidths)


def ready_instance(node: Node, name: str, spec: ModelSpec | None = None, kv_blocks: int = 100,
                   weights: int = 10) -> Instance:
    """An instance already loaded with KV in place (targets = actuals = physical)."""
    inst = Instance(name, spec or model(), node, TABLE, created=0.0)
    inst.weights.target = inst.weights.actual = inst.weights.physical = weights
    inst.kv.target = inst.kv.actual = inst.kv.physical = kv_blocks
    node.instances[name] = inst
    return inst


def request_due(rid: str, deadline: float, inst: Instance | None = None, prefilled: bool = True,
                input_tokens: int = 100, tpot: float = 0.25) -> Request:
    """A request whose next token is due at `deadline` (headroom = deadline − now)."""
    ttft = 0.5
    req = Request(rid, "m", input_tokens, 100, deadline - ttft, ttft, tpot)
    if inst is not None:
        inst.attach(req)
        if prefilled:
            inst.mark_prefilled(req)
    return req


def make_scheduler(config: SchedulerConfig = EXACT, models=None, nodes=None) -> Scheduler:
    return Scheduler(models or [model()], nodes or [node_spec()], COST, config)
