"""An observer that checks the scheduler's invariants after every event of a simulation."""
from __future__ import annotations

from collections import Counter

import pytest

from refengine.sim.loading import Storage
from refengine.sim.simulator import Simulation
from refengine.sim.workload import DEFAULT_TRACE, TraceRequest, Workload
from scheduler import (Assign, Drop, Evict, Grant, HandedOver, HandOver, RequestCancelled,
                       StepFinished, preset)
from scheduler.memory import pessimistic_usage


needs_traces = pytest.mark.skipif(not DEFAULT_TRACE.is_file(),
                                  reason=f"{DEFAULT_TRACE} absent (set REFENGINE_TRACES)")


class InvariantChecker:
    def __init__(self) -> None:
        self.sim: Simulation | None = None
        self.ended: Counter = Counter()
        self.live_grant: dict[str, int] = {}
        self.evicted_at: dict[str, int] = {}
        self.evictions = 0
        self.migrations = 0
        self.catch_ups = 0
        self.ended_in_catch_up = 0

    def __call__(self, event, actions) -> None:
        sim = self.sim
        for node in sim.scheduler.nodes.values():
            assert pessimistic_usage(node) <= node.spec.memory_bytes, node.id
            for inst in node.instances.values():
                for res in (inst.weights, inst.kv):
                    assert res.physical <= res.actual, inst.id
        if isinstance(event, StepFinished):
            self.ended.update(event.finished)
            if event.grant_done:
                self.live_grant.pop(sim._instances[event.instance].node, None)
        elif isinstance(event, RequestCancelled):
            self.ended[event.request_id] += 1
        elif isinstance(event, HandedOver):
            self.ended.update([event.request_id] if event.finished else [])
            self.catch_ups += event.produced
            self.ended_in_catch_up += event.finished
        for a in actions:
            if isinstance(a, Grant):
                assert a.node not in self.live_grant, f"second grant on {a.node}"
                self.live_grant[a.node] = a.grant_id
            elif isinstance(a, Drop):
                self.ended[a.request_id] += 1
            elif isinstance(a, Evict):
                inst = sim._instances[a.instance]
                for rid in a.requests:
                    seq = inst.running.get(rid) or inst.waiting.get(rid)
                    if seq is not None and not seq.rebuild:     # not a dropped migration copy
                        self.evictions += 1
                        self.evicted_at[rid] = seq.generated
            elif isinstance(a, HandOver):                       # no token lost or repeated
                seq = sim._instances[a.source].decoding(a.request_id)
                assert seq.generated == sim.scheduler.requests[a.request_id].generated
                assert a.request_id in sim._instances[a.destination].rebuilt
                self.migrations += 1
            elif isinstance(a, Assign) and a.resume_tokens:
                assert a.resume_tokens == self.evicted_at[a.request_id]   # no token lost

    def check_end(self, workload: Workload) -> None:
        ids = {r.request_id for r in workload.requests}
        assert set(self.ended) == ids
        assert all(n == 1 for n in self.ended.values()), "a request ended twice"
        assert self.sim._unresolved == 0
        for rid, rec in self.sim.rec.requests.items():
            assert (rec.finish is None) == (rec.dropped is not None or rec.cancelled), rid


def simulate_checked(workload: Workload, system: str, size: str, cpus: int, gpus: int,
                     storage: Storage | None = None, cancellations: dict[str, int] | None = None,
                     **overrides) -> InvariantChecker:
    checker = InvariantChecker()
    sim = Simulation(workload, preset(system, **overrides), size=size, cpus=cpus, gpus=gpus,
                     storage=storage, observer=checker, cancellations=cancellations)
    checker.sim = sim
    sim.run()
    checker.check_end(workload)
    return checker


def workload(items, n_models: int) -> Workload:
    """items: (model index, arrival, input tokens, output tokens)."""
    reqs = tuple(sorted((TraceRequest(f"r{k}", f"m{m}", t, i, o)
                         for k, (m, t, i, o) in enumerate(items)),
                        key=lambda r: (r.arrival, r.request_id)))
    return Workload("test", tuple(f"m{k}" for k in range(n_models)), reqs,
                    max((r.arrival for r in reqs), default=0.0) + 1.0)
