"""Where a simulated node's weights are, and how long a LOAD takes from there (issue 7 part 6).

Tiers per node (ServerlessLLM §2, λScale §5.1): the SSD holds every model; a host-DRAM cache holds
some (LRU under a byte budget, a model pinned while an instance on the node uses it, and a model
read from disk stays cached, as ServerlessLLM keeps host copies); the GPU holds the instances.
Loads on one node run one after another (ServerlessLLM's per-server FIFO loading queue), which is
what the scheduler's startup estimate assumes (`scheduler/startup.py`); every cache change is
reported to the scheduler as a `ModelTierChanged`.

Two loading styles (`simulate --loading`):
- `local` (ServerlessLLM): each node reads from its fastest tier holding the model, pipelined
  disk → host → device at the slowest hop's speed; the instance serves once its copy is whole.
- `multicast` (λScale): a GPU node may also receive the model from the GPUs already serving it
  (k-way split + binomial pipeline, `multicast.py`), all such loads of one scheduling decision
  forming one multicast; every node loads from its fastest source, as the scheduler's estimate
  assumes (with the figures below a peer beats the host cache); every load executes while
  loading: a step runs each block of layers as soon as it has arrived, and once the receivers
  together hold every block a step may
  instead run on a cross-node pipeline of them (full-model time plus one activation hop per extra
  stage). The LOAD is reported done when the instance can first compute without stalling: just in
  time for its waiting prompts' prefill to meet each block as it lands (a stalled step would hold
  the node's only grant, §4.2.3), or when the pipeline forms, if sooner.

Bandwidths (bytes/s) and their sources (`../shared/papers/`):
- host → GPU 12.6 GiB/s: SLINFER's ≈1 s for a 7B model with ServerlessLLM's loader from host
  memory (slinfer.md §8 item 11, the legacy `MemoryCosts` figure); the λScale artifact's
  ServerlessLLM loads Llama-2-70B from host memory over 4 GPUs in 2.55 s, ≈13.5 GB/s per GPU.
- SSD → host 4.6 GB/s: the same artifact's ServerlessLLM load of Llama-2-70B (138 GB) from SSD in
  30 s (lambdascale.md §6.2).
- GPU → GPU 30 GB/s per link: λScale delivers Llama-2-7B (13.5 GB) in 0.45 s (lambdascale.md
  §6.2, the digest's ≈30 GB/s per receiver).
- 8 execution blocks × 2 transfer blocks: the artifact's Llama-2 configs (lambdascale.md §2).
- 1 ms per pipeline hop: an assumption (activations are a few hundred kB over RDMA plus the
  controller's dispatch; the digest gives no figure).
CPU nodes use a host copy in place (SLINFER's CPU instances bind for free) and take no multicast.
"""
from __future__ import annotations

import math
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Literal

from refengine.sim.multicast import multicast
from scheduler import LoadBandwidths

GiB = 1 << 30
Loading = Literal["local", "multicast"]


@dataclass(frozen=True)
class Storage:
    """The simulated tiers and loader; `host_cache_bytes` None means every model is cached in
    every node's host memory (SLINFER's assumption, §4.5)."""

    loading: Loading = "local"
    host_cache_bytes: int | None = None
    disk_to_host: float = 4.6e9
    gpu_host_to_device: float = 12.6 * GiB
    gpu_peer: float = 30e9
    blocks: int = 8
    parts: int = 2
    hop_seconds: float = 0.001

    def bandwidths(self, kind: str) -> LoadBandwidths:
        """What the executor "measured" for a node of `kind`, as the scheduler is told."""
        if kind == "cpu":
            return LoadBandwidths(self.disk_to_host, math.inf)
        peer = self.gpu_peer if self.loading == "multicast" else None
        return LoadBandwidths(self.disk_to_host, self.gpu_host_to_device, peer)


class HostCache:
    """One node's host-memory cache: LRU by last use, in-use models pinned, never over budget."""

    def __init__(self, budget: int | None):
        self.budget = budget
        self._models: OrderedDict[str, int] = OrderedDict()
        self._pins: Counter = Counter()

    def holds(self, model: str) -> bool:
        return self.budget is None or model in self._models

    def use(self, model: str, nbytes: int) -> tuple[bool, list[str]]:
        """The node loads `model` through host memory now: touch or insert it, and pin it if it
        is (now) cached. Returns (newly cached, evicted models); a model that cannot fit beside
        the pinned ones is simply not cached."""
        if self.budget is None:
            return False, []
        if model in self._models:
            self._models.move_to_end(model)
            self._pins[model] += 1
            return False, []
        evicted = []
        unpinned = [m for m in self._models if not self._pins[m]]
        while sum(self._models.values()) + nbytes > self.budget and unpinned:
            victim = unpinned.pop(0)
            del self._models[victim]
            evicted.append(victim)
        if sum(self._models.values()) + nbytes > self.budget:
            return False, evicted
        self._models[model] = nbytes
        self._pins[model] += 1
        return True, evicted

    def release(self, model: str) -> None:
        """One user of `model`, pinned by `use`, unloaded."""
        if self.budget is not None:
            self._pins[model] -= 1


@dataclass(frozen=True)
class LoadTiming:
    """One instance's load: absolute times its execution blocks arrive, when it may compute, and
    when a cross-node pipeline of `stages` receivers could serve it (None: no pipeline)."""

    source: str
    arrivals: tuple[float, ...]
    serve: float
    pipeline_from: float | None = None
    stages: int = 1

    @property
    def full(self) -> float:
        return max(self.arrivals)

    def step_seconds(self, start: float, latency: float, hop_seconds: float) -> float:
        """A step of `latency` s (whole model resident) started at `start`: layer by layer as
        blocks arrive, or on the cross-node pipeline if that is sooner."""
        if start >= self.full:
            return latency
        t = start
        for arrival in self.arrivals:
            t = max(t, arrival) + latency / len(self.arrivals)
        if self.pipeline_from is not None and start >= self.pipeline_from:
            return min(t - start, latency + (self.stages - 1) * hop_seconds)
        return t - start


@dataclass(frozen=True)
class Receiver:
    """A node about to load; `first_step` is its first step's time with all weights resident."""

    instance: str
    node: str
    kind: str
    first_step: float = 0.0


def just_in_time(arrivals: tuple[float, ...], step: float) -> float:
    """Latest start of a `step`-second step that runs block b over [start + b·step/B, …) and
    never waits for a block: max over b of (arrival_b − b·step/B)."""
    n = len(arrivals)
    return max(a - b * step / n for b, a in enumerate(arrivals))


class Loader:
    """Plans the LOADs of one scheduling decision on the simulated tiers."""

    def __init__(self, storage: Storage, node_ids: list[str]):
        self.storage = storage
        self.caches = {n: HostCache(storage.host_cache_bytes) for n in node_ids}
        self._io_free = {n: 0.0 for n in node_ids}
        self._pinned: dict[str, tuple[str, str]] = {}     # instance → (node, model) it pins

    def plan(self, model: str, nbytes: int, receivers: list[Receiver], peers: list[str],
             now: float) -> tuple[dict[str, LoadTiming], list[tuple[str, str, str]]]:
        """Timings of `receivers` loading `model` now, `peers` being GPU nodes whose copy is
        whole; and the tier changes (node, model, tier) the scheduler must be told."""
        st = self.storage
        timings: dict[str, LoadTiming] = {}
        tiers: list[tuple[str, str, str]] = []
        remote = []
        for r in receivers:
            cache = self.caches[r.node]
            h2d = st.gpu_host_to_device if r.kind == "gpu" else math.inf
            sources = [("disk", min(st.disk_to_host, h2d))]
            if cache.holds(model):
                sources.insert(0, ("host", h2d))
            if st.loading == "multicast" and r.kind == "gpu" and peers:
                sources.insert(0, ("peer", st.gpu_peer))
            source, rate = max(sources, key=lambda s: s[1])
            if source == "peer":
                remote.append(r)
                continue
            timings[r.instance] = self._local(r, source, nbytes / rate, now)
            cached, evicted = cache.use(model, nbytes)
            tiers += [(r.node, m, "disk") for m in evicted]
            tiers += [(r.node, model, "host")] if cached else []
            if cache.holds(model):
                self._pinned[r.instance] = (r.node, model)
        if remote:
            timings.update(self._multicast(nbytes, remote, len(peers), now))
        return timings, tiers

    def release(self, instance: str) -> None:
        """`instance` unloaded: the host copy it pinned may be evicted again."""
        pinned = self._pinned.pop(instance, None)
        if pinned is not None:
            self.caches[pinned[0]].release(pinned[1])

    def _local(self, r: Receiver, source: str, seconds: float, now: float) -> LoadTiming:
        start = max(now, self._io_free[r.node])
        n = self.storage.blocks
        arrivals = tuple(start + seconds * (b + 1) / n for b in range(n))
        self._io_free[r.node] = arrivals[-1]
        eager = self.storage.loading == "multicast"
        return LoadTiming(source, arrivals,
                          just_in_time(arrivals, r.first_step) if eager else arrivals[-1])

    def _multicast(self, nbytes: int, receivers: list[Receiver], sources: int,
                   now: float) -> dict[str, LoadTiming]:
        st = self.storage
        start = max([now] + [self._io_free[r.node] for r in receivers])
        mc = multicast(len(receivers), sources, st.blocks, st.parts,
                       nbytes / (st.blocks * st.parts) / st.gpu_peer)
        pipeline = start + mc.covered if len(receivers) > 1 else None
        stages = min(len(receivers), st.blocks)
        out = {}
        for r, relative in zip(receivers, mc.arrivals):
            arrivals = tuple(start + a for a in relative)
            self._io_free[r.node] = max(arrivals)
            serve = min(just_in_time(arrivals, r.first_step),
                        pipeline if pipeline is not None else math.inf)
            out[r.instance] = LoadTiming("peer", arrivals, serve, pipeline, stages)
        return out
