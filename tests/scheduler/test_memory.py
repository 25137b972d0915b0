"""Memory subsystem (§4.3): Fig. 18 race, stale actions, watermark hysteresis, KV demand."""
import itertools
import random
from dataclasses import replace

import pytest

from scheduler import Evict, KvResize, Load, MemoryDone, ModelSpec, NodeSpec, RequestArrived, StepFinished
from scheduler import kv
from scheduler.memory import MemoryOrchestrator, optimistic_budget, pessimistic_usage
from scheduler.state import Node
from sched_builders import EXACT, make_scheduler, model, node_spec, ready_instance, request_due

UNIT = ModelSpec("m", "tiny", 0, 1, block_tokens=1, max_context=1)     # 1 block = 1 byte


def node_with(sizes, capacity=100):
    node = Node(NodeSpec("g0", "gpu", "dev", capacity))
    insts = [ready_instance(node, name, UNIT, kv_blocks=size, weights=0)
             for name, size in sizes.items()]
    return node, insts


def run_to_completion(node, orch, rng):
    """Carry out dispatched actions in a random interleaving; check safety at every moment."""
    running = []
    while True:
        startable = [i for i in node.instances.values() if i.outbox and i.in_flight is None]
        choices = [("start", i) for i in startable] + [("finish", op) for op in running]
        if not choices:
            return
        what, item = rng.choice(choices)
        if what == "start":
            op = orch.next_dispatch(item)
            if op is not None:
                running.append(op)
        else:
            running.remove(item)
            orch.complete(item)
            orch.wake_station(node)
        # while a resize runs it may hold max(old, new); physical never exceeds pessimistic
        held = sum(max(i.kv.physical, i.in_flight.value if i.in_flight else 0)
                   for i in node.instances.values())
        assert held <= pessimistic_usage(node) <= node.spec.memory_bytes


@pytest.mark.parametrize("order", list(itertools.permutations(
    [("A", 50), ("B", 40), ("C", 10)])))
def test_fig18_race_never_exceeds_capacity(order):
    # three instances at 30 % each: +20 %, +10 %, −20 % at once. Uncoordinated, the grows can land
    # before the shrink and peak at 120 % (OOM); the reservation station serialises them.
    for seed in range(20):
        node, _ = node_with({"A": 30, "B": 30, "C": 30})
        orch = MemoryOrchestrator()
        for name, size in order:
            orch.register(node.instances[name], "kv", size)
        assert optimistic_budget(node) == 100
        run_to_completion(node, orch, random.Random(seed))
        assert {n: i.kv.physical for n, i in node.instances.items()} == {"A": 50, "B": 40, "C": 10}
        assert not node.station


def test_stale_actions_are_dropped():
    node, (a, b) = node_with({"A": 30, "B": 60})
    orch = MemoryOrchestrator()
    orch.register(a, "kv", 50)          # 90 + 20 > 100: waits in the reservation station
    orch.register(a, "kv", 35)          # supersedes it; FIFO keeps it behind
    assert len(node.station) == 2 and not a.outbox
    orch.register(b, "kv", 40)          # a shrink: straight to B
    op = orch.next_dispatch(b)
    orch.complete(op)
    orch.wake_station(node)
    dispatched = orch.next_dispatch(a)
    assert dispatched.value == 35       # the stale "50" never reaches the executor
    assert orch.next_dispatch(a) is None
    orch.complete(dispatched)
    assert (a.kv.actual, a.kv.physical) == (35, 35)


def test_shrink_counts_at_old_size_until_done():
    node, (a,) = node_with({"A": 60})
    orch = MemoryOrchestrator()
    orch.register(a, "kv", 20)
    assert optimistic_budget(node) == 20 and pessimistic_usage(node) == 60
    orch.complete(orch.next_dispatch(a))
    assert pessimistic_usage(node) == 20


def test_watermark_hysteresis():
    w = 0.25
    assert kv.recommended_blocks(100, w) == 125
    assert kv.scale_up_target(100, 100, w, free_blocks=1000) is None
    assert kv.scale_up_target(99, 100, w, free_blocks=1000) == 125      # early, to M_recommend
    assert kv.scale_up_target(99, 100, w, free_blocks=10) == 109        # compromise: what the node has
    assert kv.scale_up_target(0, 512, w, free_blocks=521) == 521        # a new instance, memory tight
    assert kv.scale_up_target(99, 100, w, free_blocks=0) is None        # nothing to grow into
    assert kv.scale_down_target(160, 100, w) == 125                     # 156.25 < 160
    assert kv.scale_down_target(156, 100, w) is None                    # lazy: keep


@pytest.mark.parametrize("w, resizes", [(0.25, 1), (0.0, 6)])
def test_watermark_prevents_ping_pong(w, resizes):
    current, count = 0, 0
    for required in (100, 90, 100, 90, 100, 90):
        target = kv.scale_up_target(current, required, w, 10_000) \
            or kv.scale_down_target(current, required, w)
        if target is not None:
            current, count = target, count + 1
    assert count == resizes


def test_kv_demand_eq2_and_artifact_pad():
    m = model(max_context=64)          # 16-token blocks, floor = 4 blocks
    reqs = [request_due("a", 1.0, input_tokens=100), request_due("b", 1.0, input_tokens=10)]
    reqs[0].generated = 30
    pad = kv.required_blocks(m, reqs, EXACT, kv.OutputEstimator(220))
    assert pad == m.blocks_for(130 + 512) + m.blocks_for(10 + 512)
    eq2 = kv.required_blocks(m, reqs, replace(EXACT, kv_estimate="eq2"), kv.OutputEstimator(50))
    assert eq2 == m.blocks_for(150) + m.blocks_for(60)                   # I + max(O, Ō)
    assert kv.required_blocks(m, [], EXACT, kv.OutputEstimator(220)) == 4   # L_min floor


def test_underestimation_evicts_the_longest_headroom_request():
    spec = model(fixed_kv=16 * 10)                                      # 10 blocks, fixed
    cpu = NodeSpec("c0", "cpu", "dev", 10_000, elastic_kv=False)
    sched = make_scheduler(models=[spec], nodes=[cpu])
    node = sched.nodes["c0"]
    inst = ready_instance(node, "i", spec, kv_blocks=10)
    sched.life.instances["i"] = inst
    for rid, deadline, tokens in (("urgent", 1.0, 40), ("relaxed", 5.0, 60)):
        sched.life.requests[rid] = request_due(rid, deadline, inst, input_tokens=tokens)
    node.grant_instance, inst.computing = inst, True
    actions = sched.handle(StepFinished("i", 1, "decode", ("urgent", "relaxed"), (), 9, 0.1, True),
                           now=0.1)
    evicts = [a for a in actions if isinstance(a, Evict)]
    assert [e.requests for e in evicts] == [("relaxed",)]
    assert "relaxed" in sched.requests and "relaxed" not in inst.requests


def test_a_new_instance_on_a_tight_node_gets_the_kv_the_node_has_not_more():
    """M_recommend (80 blocks) does not fit beside the weights, M_require (64) does: the KV grow
    asks for what the node has. Asking for M_recommend would wait in the station forever, and the
    request with it (found serving with --cpu-memory just above weights + a full context)."""
    spec = model(weight=10, max_context=1024)                 # floor: 64 blocks of 16 bytes
    node = node_spec(memory=10 + 64 * 16 + 8)
    sched = make_scheduler(models=[spec], nodes=[node])
    actions = sched.handle(RequestArrived("r", "m", 8, 4, arrival=0.0), now=0.0)
    (load,) = [a for a in actions if isinstance(a, Load)]
    actions = sched.handle(MemoryDone(load.instance, load.action_id, 0.01), now=0.01)
    (resize,) = [a for a in actions if isinstance(a, KvResize)]
    assert resize.blocks == 64


@pytest.mark.parametrize("copies", [False, True])
def test_an_instance_on_a_node_keeping_bf16_weight_copies_is_charged_for_them(copies):
    """The node above plus 500 bytes: an instance charged 500 bytes of bf16 prefill copies beside
    its weights is as tight as above (the KV grow gets the floor, 64 blocks); one whose node keeps
    no copies has room for M_recommend (80)."""
    spec = replace(model(weight=10, max_context=1024), bf16_copy_bytes=500)
    node = replace(node_spec(memory=10 + 500 + 64 * 16 + 8), bf16_copies=copies)
    sched = make_scheduler(models=[spec], nodes=[node])
    actions = sched.handle(RequestArrived("r", "m", 8, 4, arrival=0.0), now=0.0)
    (load,) = [a for a in actions if isinstance(a, Load)]
    actions = sched.handle(MemoryDone(load.instance, load.action_id, 0.01), now=0.01)
    (resize,) = [a for a in actions if isinstance(a, KvResize)]
    assert resize.blocks == (64 if copies else 80)
