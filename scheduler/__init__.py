"""SLINFER's scheduler as pure policy (HPCA 2026; `../shared/papers/slinfer.md`).

Events in, actions out: `Scheduler(models, nodes, cost, config).handle(event, now)`. No clock,
threads, arrays or I/O, so the simulator and the live runtime drive the same code. Module map:

- `specs`       ModelSpec, NodeSpec, LoadBandwidths: what the scheduler is told at construction
- `events`      RequestArrived, StepFinished, HandedOver, MemoryDone, RequestCancelled, InstanceFailed,
                ModelTierChanged, Tick
- `actions`     Grant, Assign, CreateInstance, ReleaseInstance, Load, Unload, KvResize, Evict,
                Migrate, HandOver, Drop, ColdStartGrace
- `codec`       JSON lines for events and actions (logging, replay)
- `costmodel`   profiled latency tables, interpolation, the profile JSON format (§4.2.2)
- `config`      SchedulerConfig and the presets: slinfer, sllm, sllm+c, sllm+c+s, ablations
- `slo`         SLOs, cumulative deadlines, headroom (§4.2.1)
- `estimate`    latency estimates with safety margin, time slices, grant length
- `tokensched`  per-node token-level scheduling (§4.2.3)
- `admission`   shadow validation (§4.2.4); `shadowsim` its full-simulation variant
- `kv`          KV demand (Eq. 2), watermark sizing (§4.3.1–4.3.2)
- `memory`      optimistic budget, pessimistic usage, reservation station (§4.3.3)
- `partition`   instance caps, fixed KV and static time shares (baselines)
- `consolidation` bin-packing orders and preemption victims (§4.4)
- `migration`   live migration of a victim's requests when cheaper than drop-and-re-prefill
- `startup`     a cold instance's start-up estimate: queue + bytes ÷ tier bandwidth (ServerlessLLM)
- `placement`   existing instance → preemption → new instance, earliest start-up first (§4.1)
- `lifecycle`   create, attach, keep-alive reclaim, eviction, cold-start grace (§4.5)
- `core`        the Scheduler that wires them together

Executor loop (the simulator in `refengine/sim/simulator.py` is a complete example)::

    sched = Scheduler(models, nodes, CostModel.from_dirs(profile_dir), preset("slinfer"))
    for each event at time now (arrival, step done, memory action done, cancel, failure, timer,
                                a model entering or leaving a host's memory cache):
        for action in sched.handle(event, now):
            CreateInstance  -> make an empty instance (no weights, 0 KV) on the node
            Load / Unload / KvResize / Evict -> do it now; then MemoryDone(action_id, seconds)
            Assign          -> queue the request on the instance (re-prefill resume_tokens too)
            Migrate         -> rebuild the request's KV on the destination (at its next prefill)
            HandOver        -> move the request's stream from source to destination; HandedOver
                               if its catch-up made the request's next token
            Grant           -> run up to `iterations` steps of `kind`; StepFinished after each
            Drop            -> fail the request (it counts as an SLO miss)
            ColdStartGrace  -> note it for SLO accounting
            ReleaseInstance -> forget the instance
        arm a timer for sched.next_wakeup() and send Tick() when it fires
"""
from scheduler.actions import (Action, Assign, ColdStartGrace, CreateInstance, Drop, Evict, Grant,
                               HandOver, KvResize, Load, Migrate, ReleaseInstance, Unload)
from scheduler.config import LIVE_MIGRATION, PRESETS, SchedulerConfig, preset
from scheduler.core import Scheduler
from scheduler.costmodel import CostModel, LatencyTable, load_table
from scheduler.events import (Event, HandedOver, InstanceFailed, MemoryDone, ModelTierChanged,
                              RequestArrived, RequestCancelled, StepFinished, Tick)
from scheduler.slo import SloPolicy
from scheduler.specs import LoadBandwidths, ModelSpec, NodeSpec

__all__ = [
    "Action", "Assign", "ColdStartGrace", "CreateInstance", "CostModel", "Drop", "Event", "Evict",
    "Grant", "HandOver", "HandedOver", "InstanceFailed", "KvResize", "LatencyTable", "Load",
    "LoadBandwidths", "MemoryDone", "Migrate", "ModelSpec", "ModelTierChanged", "NodeSpec", "PRESETS",
    "ReleaseInstance", "RequestArrived", "RequestCancelled", "Scheduler", "SchedulerConfig",
    "SloPolicy", "StepFinished", "Tick", "Unload", "load_table", "preset",
]
