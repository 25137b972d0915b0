"""How long until a cold instance can start: ServerlessLLM's startup estimate (OSDI'24 §5.1).

A cold instance's weights come from the nearest place that holds them: another device of the same
kind already serving the model (λScale's multicast, where the executor can), the host-memory cache,
or the disk. ServerlessLLM estimates the start-up as `t = q + n / b`: `q` the wait for the loads
queued before it on the same machine (one FIFO loading queue per host, so loads do not share
bandwidth and times stay predictable), `n` the checkpoint bytes, `b` the bandwidth of the slowest
hop on the path (disk → host → device is pipelined, so a load from disk runs at min(disk, H2D)).
The executor is expected to load from the fastest source available, as the estimate assumes.

Invariants:
- nothing is assumed: a node whose `NodeSpec.bandwidths` the executor did not measure gets no
  estimate (None), and placement and the cold-start grace stay SLINFER's (measured load time);
- tiers are known only from `ModelTierChanged` reports; a model not reported is on disk;
- a host's queue holds the estimated end of every planned load there until the load completes or
  its instance is released, so `q` = latest such end − now (never negative).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

from scheduler.specs import ModelSpec, Tier
from scheduler.state import Instance, Node

Source = Literal["peer", "host", "disk"]


@dataclass(frozen=True)
class StartupEstimate:
    source: Source
    queue: float
    transfer: float

    @property
    def seconds(self) -> float:
        return self.queue + self.transfer


def cold_grace(inst: Instance, now: float) -> float | None:
    """Seconds until a cold instance is estimated to be loaded: the TTFT grace of a request
    attached to it now. None for a warm instance or one without an estimate."""
    if inst.ready_once or inst.ready_at is None:
        return None
    return max(0.0, inst.ready_at - now)


class StartupEstimator:
    def __init__(self) -> None:
        self._tiers: dict[tuple[str, str], Tier] = {}
        self._loads: dict[str, dict[str, float]] = {}

    def tier_changed(self, host: str, model: str, tier: Tier) -> None:
        self._tiers[(host, model)] = tier

    def tier(self, host: str, model: str) -> Tier:
        return self._tiers.get((host, model), "disk")

    def queue(self, host: str, now: float) -> float:
        """Seconds until the loads already planned on `host` are estimated to drain."""
        ends = self._loads.get(host)
        return max(0.0, max(ends.values()) - now) if ends else 0.0

    def estimate(self, node: Node, model: ModelSpec, now: float,
                 serving: Iterable[Instance] = ()) -> StartupEstimate | None:
        """Start-up of `model` on `node` from its fastest source; `serving` are the model's
        instances, any loaded one on another node of the same kind being a peer source."""
        bw = node.spec.bandwidths
        if bw is None:
            return None
        host = node.spec.host_id
        sources: list[tuple[Source, float]] = []
        if bw.peer_to_device and any(i.loaded and i.node is not node and i.node.kind == node.kind
                                     for i in serving):
            sources.append(("peer", bw.peer_to_device))
        if self.tier(host, model.name) == "host":
            sources.append(("host", bw.host_to_device))
        sources.append(("disk", min(bw.disk_to_host, bw.host_to_device)))
        source, rate = max(sources, key=lambda s: s[1])
        return StartupEstimate(source, self.queue(host, now), model.weight_bytes / rate)

    def plan(self, inst: Instance) -> None:
        """`inst` was created with `ready_at` from an estimate: its load joins the host's queue."""
        if inst.ready_at is not None:
            self._loads.setdefault(inst.node.spec.host_id, {})[inst.id] = inst.ready_at

    def finished(self, inst: Instance) -> None:
        """The instance's load completed (or will never run): it leaves the queue."""
        loads = self._loads.get(inst.node.spec.host_id)
        if loads is not None:
            loads.pop(inst.id, None)
