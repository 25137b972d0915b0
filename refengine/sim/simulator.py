"""Discrete-event cluster simulator: the second executor of the scheduler (DESIGN.md).

A virtual clock and a heap of events, ordered by (time, kind, sequence number); no polling. The
simulator replays arrivals, carries out the scheduler's actions — steps take their profiled
latency, memory actions their modelled duration (`cluster.MemoryCosts`; with a `Storage`, loads
come from simulated tiers, `loading.py`), a migration's hand-over the catch-up prefill of the tokens
its source made since the rebuild — and reports back the events the live runtime would:
`StepFinished`, `HandedOver`, `MemoryDone`, `ModelTierChanged`, `Tick` at `next_wakeup()`. It
holds no policy; every decision is `Scheduler.handle`.

`cancellations` (request id → tokens) makes clients leave: once a request has streamed that many
tokens (0: as soon as it arrived, queued or waiting for a cold start), the executor stops its
sequence and sends `RequestCancelled`, as the live runtime does when a client disconnects.

As on the live runtime, where each device has one thread, a node computes one thing at a time: a
catch-up waits for the step running on its node, and the steps granted during it (and the memory
actions of the instance catching up) wait for it.

Invariant: the scheduler is timed with a real clock around `handle` only.
"""
from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from dataclasses import replace
from functools import partial
from time import perf_counter
from typing import IO, Callable, Mapping

from refengine.sim.cluster import MemoryCosts, model_spec, nodes as make_nodes
from refengine.sim.engine import Sequence, SimInstance, StepOutcome
from refengine.sim.event_kinds import (ARRIVAL, CANCEL, DEFERRED, HANDED, MEMORY, SAMPLE, STEP,
                                       TICK, TIER)
from refengine.sim.loading import Loader, LoadTiming, Receiver, Storage
from refengine.sim.metrics import Recorder, RequestRecord
from refengine.sim.migration import MigrationExecutor
from refengine.sim.workload import Workload
from scheduler import (Assign, ColdStartGrace, CostModel, CreateInstance, Drop, Evict, Grant,
                       HandOver, KvResize, Load, MemoryDone, Migrate,
                       ModelTierChanged, NodeSpec, ReleaseInstance, RequestArrived,
                       RequestCancelled, Scheduler, SchedulerConfig, StepFinished, Tick, Unload)
from scheduler.codec import encode



class Simulation(MigrationExecutor):
    def __init__(self, workload: Workload, config: SchedulerConfig, size: str = "7b",
                 cpus: int = 4, gpus: int = 4, cost: CostModel | None = None,
                 memory_costs: MemoryCosts = MemoryCosts(),
                 node_specs: list[NodeSpec] | None = None,
                 storage: Storage | None = None,
                 log: IO[str] | None = None,
                 observer: Callable[[object, list], None] | None = None,
                 cancellations: Mapping[str, int] | None = None):
        """`storage` switches LOADs to the tier model (and tells the scheduler the bandwidths);
        `log` gets a JSON line per event; `observer(event, actions)` runs after each one;
        `cancellations`: the requests whose clients leave, after how many tokens."""
        self.workload = workload
        self.cost = cost or CostModel.shipped()
        self.models = {name: model_spec(name, size) for name in workload.models}
        specs = node_specs or make_nodes(cpus, gpus)
        if storage is not None:
            specs = [replace(n, bandwidths=storage.bandwidths(n.kind)) for n in specs]
        self.node_specs = {n.node_id: n for n in specs}
        self.storage = storage
        self.loader = Loader(storage, list(self.node_specs)) if storage is not None else None
        self.scheduler = Scheduler(self.models.values(), self.node_specs.values(), self.cost,
                                   config)
        self.memory_costs = memory_costs
        self.log = log
        self.observer = observer
        self.rec = Recorder()
        self.now = 0.0
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._tick_at: float | None = None
        self._instances: dict[str, SimInstance] = {}
        self._grants: dict[str, list] = {}
        self._free_at: dict[str, float] = defaultdict(float)   # node -> when its compute is free
        self._arriving: Counter = Counter()     # instance -> hand-overs to it waiting for a catch-up
        self._stepping: dict[str, tuple[str, ...]] = {}  # instance -> what its step in flight advances
        self._born: dict[str, float] = {}
        self._started: set[str] = set()
        self._loads: list[tuple[SimInstance, Load]] = []
        self._timings: dict[str, LoadTiming] = {}
        self._outputs = {r.request_id: r.output_tokens for r in workload.requests}
        self._leave_after = dict(cancellations or {})
        self._streamed: Counter = Counter()     # request -> tokens made, for those that leave
        self._unresolved = len(workload.requests)

    # -- the loop ---------------------------------------------------------------------------------

    def _push(self, when: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, kind, self._seq, payload))

    def run(self, on_progress: Callable[[float], None] | None = None) -> Recorder:
        """Run until every request finished or was dropped; returns the recorder."""
        for r in self.workload.requests:
            self.rec.requests[r.request_id] = RequestRecord(r.model, r.arrival, r.input_tokens,
                                                            r.output_tokens)
            self._push(r.arrival, ARRIVAL, r)
        self._push(0.0, SAMPLE, None)
        if self.storage is not None and self.storage.host_cache_bytes is None:
            for node in self.node_specs:
                for model in self.models:
                    self._push(0.0, TIER, (node, model, "host"))
        handlers = {TIER: self._on_tier, MEMORY: self._on_memory, STEP: self._on_step,
                    HANDED: self._on_handed, DEFERRED: self._on_deferred, CANCEL: self._on_cancel,
                    ARRIVAL: self._on_arrival, TICK: self._on_tick, SAMPLE: self._on_sample}
        while self._heap:
            when, kind, _, payload = heapq.heappop(self._heap)
            self.now = when
            handlers[kind](payload)
            if on_progress is not None:
                on_progress(when)
            if self._unresolved == 0 and when >= self.workload.duration:
                break
        for iid in list(self._born):
            self._retire_instance(iid)
        self.rec.kv_overflows = sum(i.kv_overflows for i in self._instances.values())
        return self.rec

    def _handle(self, event) -> None:
        t0 = perf_counter()
        actions = self.scheduler.handle(event, self.now)
        self.rec.sched_time(type(event).__name__, perf_counter() - t0)
        if self.log is not None:
            self._write_log(event, actions)
        if self.observer is not None:
            self.observer(event, actions)
        for action in actions:
            self._apply(action)
        if self._loads:
            self._start_loads()
        wake = self.scheduler.next_wakeup()
        if wake is not None and (self._tick_at is None or wake < self._tick_at):
            self._tick_at = max(wake, self.now)
            self._push(self._tick_at, TICK, self._tick_at)

    def _write_log(self, event, actions) -> None:
        self.log.write(json.dumps({"t": self.now, "event": encode(event),
                                   "actions": [encode(a) for a in actions]}) + "\n")

    # -- events -----------------------------------------------------------------------------------

    def _on_arrival(self, r) -> None:
        self._handle(RequestArrived(r.request_id, r.model, r.input_tokens, r.output_tokens,
                                    r.arrival))
        if self._leave_after.get(r.request_id) == 0:
            self._push(self.now, CANCEL, r.request_id)

    def _on_tier(self, change) -> None:
        self._handle(ModelTierChanged(*change))

    def _on_tick(self, when: float) -> None:
        if when != self._tick_at:
            return
        self._tick_at = None
        self._handle(Tick())

    def _on_sample(self, _) -> None:
        if self.now < self.workload.duration:
            used = {"cpu": set(), "gpu": set()}
            for inst in self._instances.values():
                kind = self.node_specs[inst.node].kind
                used[kind].add(inst.node)
                if kind == "gpu" and inst.kv_blocks:
                    weights = inst.model.weight_bytes
                    kv_bytes = inst.model.block_bytes
                    self.rec.kv_util.append(inst.kv_used / inst.kv_blocks)
                    self.rec.mem_util.append((weights + inst.kv_used * kv_bytes)
                                             / (weights + inst.kv_blocks * kv_bytes))
            for kind, nodes in used.items():
                self.rec.nodes_used[kind].append(len(nodes))
            self._push(self.now + 1.0, SAMPLE, None)

    def _on_step(self, payload) -> None:
        inst, grant, outcome = payload
        self._stepping.pop(inst.instance_id, None)
        if self._leave_after:           # a client that left during the step hears of it no more
            outcome.sequences, outcome.finished = (
                tuple(r for r in ids if not self.rec.requests[r].cancelled)
                for ids in (outcome.sequences, outcome.finished))
        state = self._grants[inst.instance_id]
        state[1] -= 1
        done = state[1] == 0 or not inst.has_work(grant.kind)
        kind = self.node_specs[inst.node].kind
        if outcome.kind == "prefill":
            for rid in outcome.sequences:
                rec = self.rec.requests[rid]
                if rec.first_token is None:
                    rec.first_token = self.now
        elif outcome.batch:
            self.rec.decode_tokens[kind] += len(outcome.sequences)
            self.rec.batch_hist[kind][outcome.batch] += 1
        self._finished(outcome.finished)
        self._count_streamed(outcome.sequences)
        if done:
            del self._grants[inst.instance_id]
        self._handle(StepFinished(inst.instance_id, grant.grant_id, outcome.kind,
                                  outcome.sequences, outcome.finished, inst.kv_used,
                                  outcome.elapsed, done))
        if not done:
            self._start_step(inst, grant)

    def _finished(self, request_ids: tuple[str, ...]) -> None:
        for rid in request_ids:
            self.rec.requests[rid].finish = self.now
            self._unresolved -= 1

    def _count_streamed(self, request_ids: tuple[str, ...]) -> None:
        """Clients that leave do so once they have their number of tokens (`CANCEL`, now)."""
        if not self._leave_after:       # (a step's cost when no client leaves: this test)
            return
        for rid in request_ids:
            if rid in self._leave_after:
                self._streamed[rid] += 1
                if self._streamed[rid] == self._leave_after[rid]:
                    self._push(self.now, CANCEL, rid)

    def _on_cancel(self, request_id: str) -> None:
        """The client left: its sequence stops where it runs (a rebuild of it elsewhere is the
        scheduler's to drop), and the scheduler hears of it. Nothing, if it ended meanwhile."""
        rec = self.rec.requests[request_id]
        if rec.finish is not None or rec.dropped is not None:
            return
        for inst in self._instances.values():
            seq = (inst.waiting.get(request_id) or inst.running.get(request_id)
                   or inst.handing.get(request_id))
            if seq is not None and not seq.rebuild:
                inst.remove(request_id)
        rec.cancelled = True
        self._unresolved -= 1
        self._handle(RequestCancelled(request_id))

    def _on_deferred(self, start: Callable[[], None]) -> None:
        start()
        if self._loads:
            self._start_loads()

    def _on_memory(self, payload) -> None:
        inst, action, duration = payload
        if isinstance(action, Load):
            inst.weights = True
        elif isinstance(action, Unload):
            inst.weights = False
            if self.loader is not None:
                self.loader.release(inst.instance_id)
                self._timings.pop(inst.instance_id, None)
        elif isinstance(action, KvResize):
            inst.kv_blocks = action.blocks
            if self.node_specs[inst.node].kind == "gpu":
                self.rec.resize_seconds += duration
        self._handle(MemoryDone(inst.instance_id, action.action_id, duration))

    # -- actions ----------------------------------------------------------------------------------

    def _deferred(self, node: str, start: Callable[[], None]) -> bool:
        """Queue `start` until the node's compute is free, if it is busy (a catch-up); True if so."""
        if self._free_at[node] <= self.now:
            return False
        self._push(self._free_at[node], DEFERRED, start)
        return True

    def _computes(self, inst: SimInstance, start: float, seconds: float) -> float:
        """Occupy the instance's node for a pass of `seconds` (profiled) from `start`; returns its
        duration, longer while its weights are still arriving (executing while loading)."""
        timing = self._timings.get(inst.instance_id)
        if timing is not None and start < timing.full:
            seconds = timing.step_seconds(start, seconds, self.storage.hop_seconds)
        self._free_at[inst.node] = start + seconds
        return seconds

    def _start_step(self, inst: SimInstance, grant: Grant) -> None:
        if self._deferred(inst.node, partial(self._start_step, inst, grant)):
            return
        if grant.kind == "prefill" or inst.running:
            outcome: StepOutcome = inst.step(grant.kind)
            outcome.elapsed = self._computes(inst, self.now, outcome.elapsed)
            self._stepping[inst.instance_id] = outcome.sequences
        else:       # its one request ended in the catch-up it waited for: the grant runs empty
            outcome = StepOutcome(grant.kind, (), (), 0.0, 0)
        self._push(self.now + outcome.elapsed, STEP, (inst, grant, outcome))

    def _apply(self, action) -> None:
        if isinstance(action, Grant):
            inst = self._instances[action.instance]
            if action.kind == "prefill":
                self._send_new_tokens(inst)
            if not inst.has_work(action.kind) and not self._arriving[action.instance]:
                raise RuntimeError(f"grant {action} for an instance with no {action.kind} work")
            self._grants[action.instance] = [action, action.iterations]
            if action.instance not in self._started:
                self._started.add(action.instance)
                self.rec.startups.append(self.now - self._born[action.instance])
            self._start_step(inst, action)
        elif isinstance(action, Assign):
            out = self._outputs[action.request_id]
            self._instances[action.instance].add(
                Sequence(action.request_id, action.input_tokens, action.resume_tokens, out))
        elif isinstance(action, Migrate):
            self._migrate(action)
        elif isinstance(action, HandOver):
            if action.source in self._grants:
                raise RuntimeError(f"{action} while the source is computing")
            self._start_hand_over(action)
        elif isinstance(action, CreateInstance):
            model = self.models[action.model]
            hw = self.node_specs[action.node].hardware
            self._instances[action.instance] = SimInstance(
                action.instance, action.node, model, self.cost.table(model.profile, hw))
            self._born[action.instance] = self.now
        elif isinstance(action, ReleaseInstance):
            self._retire_instance(action.instance)
        elif isinstance(action, (Load, Unload, KvResize, Evict)):
            self._start_memory(action)
        elif isinstance(action, Drop):
            rec = self.rec.requests[action.request_id]
            rec.dropped = action.reason
            if rec.finish is None:
                self._unresolved -= 1
        elif isinstance(action, ColdStartGrace):
            self.rec.requests[action.request_id].grace = action.seconds

    def _start_memory(self, action) -> None:
        inst = self._instances[action.instance]
        if inst.handing and self._deferred(inst.node, partial(self._start_memory, action)):
            return
        kind = self.node_specs[inst.node].kind
        costs = self.memory_costs
        if isinstance(action, Load) and self.loader is not None:
            self._loads.append((inst, action))
            return
        if isinstance(action, Load):
            duration = costs.load(kind, inst.model.weight_bytes)
        elif isinstance(action, Unload):
            duration = costs.unload(kind)
        elif isinstance(action, KvResize):
            bb = inst.model.block_bytes
            duration = costs.resize(kind, inst.kv_blocks * bb, action.blocks * bb,
                                    inst.kv_used * bb)
        else:
            for rid in action.requests:
                seq = inst.remove(rid)
                if seq is None or not seq.rebuild:      # a dropped rebuild is no eviction
                    self.rec.requests[rid].evictions += 1
            duration = 0.0
        self._push(self.now + duration, MEMORY, (inst, action, duration))

    def _start_loads(self) -> None:
        """Plan the LOADs of one decision together (a λScale multicast per model)."""
        by_model: dict[str, list] = defaultdict(list)
        for inst, action in self._loads:
            by_model[inst.model.name].append((inst, action))
        self._loads = []
        for model, loads in by_model.items():
            receivers = [Receiver(i.instance_id, i.node, self.node_specs[i.node].kind,
                                  i.table.prefill(sum(q.context for q in i.waiting.values())))
                         for i, _ in loads]
            targets = {r.node for r in receivers}
            peers = sorted({i.node for i in self._instances.values()
                            if i.model.name == model and i.node not in targets
                            and self.node_specs[i.node].kind == "gpu" and self._whole(i)})
            timings, tiers = self.loader.plan(model, loads[0][0].model.weight_bytes, receivers,
                                              peers, self.now)
            for inst, action in loads:
                timing = timings[inst.instance_id]
                self._timings[inst.instance_id] = timing
                self.rec.load_sources[timing.source] += 1
                self._push(timing.serve, MEMORY, (inst, action, timing.serve - self.now))
            for change in tiers:
                self._push(self.now, TIER, change)

    def _whole(self, inst: SimInstance) -> bool:
        """The instance holds its complete weights (a multicast source)."""
        timing = self._timings.get(inst.instance_id)
        return inst.weights and (timing is None or self.now >= timing.full)

    def _retire_instance(self, iid: str) -> None:
        born = self._born.pop(iid, None)
        inst = self._instances.pop(iid, None) if born is not None else None
        if inst is not None and self.node_specs[inst.node].kind == "gpu":
            self.rec.gpu_instance_seconds += self.now - born
            self.rec.kv_overflows += inst.kv_overflows
