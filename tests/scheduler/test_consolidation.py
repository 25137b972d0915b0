"""Consolidation (§4.4): bin-packing orders and preemption victim choice."""
from dataclasses import replace

from scheduler import NodeSpec
from scheduler.admission import ShadowValidator
from scheduler.consolidation import (find_victim, idle_instances, idle_to_reclaim,
                                     order_instances, order_nodes)
from scheduler.estimate import Estimator
from scheduler.kv import OutputEstimator
from scheduler.slo import SloPolicy
from scheduler.state import Node, Request
from sched_builders import EXACT, model, node_spec, ready_instance, request_due


def validator(config=EXACT):
    return ShadowValidator(config, Estimator(config), OutputEstimator(220))


def with_batch(node, name, batch, kv_blocks=100, spec=None, tpot=0.25):
    inst = ready_instance(node, name, spec, kv_blocks=kv_blocks)
    for k in range(batch):
        request_due(f"{name}-{k}", 50.0, inst, input_tokens=16, tpot=tpot)
    return inst


def new_request(rid="r", tpot=EXACT.slo.tpot_slo):
    return Request(rid, "m", 16, 10, 0.0, EXACT.slo.ttft(16), tpot)


def test_instances_largest_batch_first_cpu_first_on_ties():
    gpu, cpu = Node(node_spec("g0")), Node(node_spec("c0", kind="cpu"))
    a, b, c = with_batch(gpu, "a", 3), with_batch(gpu, "b", 7), with_batch(cpu, "c", 3)
    assert order_instances([a, b, c], "pack") == [b, c, a]
    assert order_instances([a, b, c], "balance") == [c, a, b]
    assert order_instances([a, b, c], "round_robin", turn=4) == [b, c, a]


def test_nodes_most_loaded_first_empty_last():
    v = validator()
    empty, light, heavy = (Node(node_spec(n)) for n in ("g0", "g1", "g2"))
    with_batch(light, "l", 1, kv_blocks=10)
    with_batch(heavy, "h", 1, kv_blocks=300)
    assert [n.id for n in order_nodes([empty, light, heavy], "pack", v)] == ["g2", "g1", "g0"]
    assert [n.id for n in order_nodes([empty, light, heavy], "balance", v)] == ["g0", "g1", "g2"]


def test_gpu_memory_victim_smaller_batch_smallest_first_big_enough():
    # 16-byte blocks, 10-byte weights; the node is full
    node = Node(NodeSpec("g0", "gpu", "dev", 10 * 4 + 16 * (40 + 4 + 100 + 8)))
    target = with_batch(node, "target", 3, kv_blocks=40, tpot=1.0)
    with_batch(node, "tiny", 1, kv_blocks=4, tpot=1.0)             # footprint 74 B: too small for the gap
    mid = with_batch(node, "mid", 2, kv_blocks=100, tpot=1.0)      # 1,610 B: the smallest that covers it
    with_batch(node, "big", 5, kv_blocks=8, tpot=1.0)              # larger batch: never a victim
    r = new_request(tpot=1.0)
    v = validator(replace(EXACT, slo=SloPolicy(tpot=1.0)))  # compute is no constraint here
    # with r the target needs 4 · ⌈(16 + 512) / 16⌉ = 132 blocks: 92 · 16 = 1,472 B too many
    assert v.memory_overflow(target, r) == 1472
    assert not v.admit(target, r, now=0.0)
    assert find_victim(target, r, 0.0, v) is mid


def test_cpu_compute_victim():
    cpu = node_spec("c0", kind="cpu", elastic=False, memory=100_000)
    spec = model(fixed_kv=16 * 1000)
    node = Node(cpu)
    target = with_batch(node, "target", 5, spec=spec)     # 150 ms
    small = with_batch(node, "small", 1, spec=spec)       # 70 ms
    with_batch(node, "idle", 0, spec=spec)                # batch 0: frees no compute
    r = new_request()
    v = validator()
    with_batch(node, "other", 1, spec=spec)               # Σ slices with r: (170 + 70 + 70) / 250
    assert not v.admit(target, r, now=0.0)
    assert find_victim(target, r, 0.0, v) is small        # first smaller batch with slice ≥ gap


def idle(node, name, since, kv_blocks):
    inst = ready_instance(node, name, kv_blocks=kv_blocks)       # 10 B of weights, 16 B blocks
    inst.idle_since = since
    return inst


def test_idle_instances_to_reclaim_least_recently_used_first_as_few_as_close_the_gap():
    node = Node(node_spec("g0"))
    newer, older = idle(node, "newer", 5.0, 10), idle(node, "older", 2.0, 1)   # 170 B, 26 B
    with_batch(node, "busy", 1)
    gone = idle(node, "gone", 1.0, 10)
    gone.retired = True
    assert idle_instances(node) == [older, newer]
    assert idle_to_reclaim(node, memory_gap=0, slots_gap=0) == []
    assert idle_to_reclaim(node, memory_gap=20, slots_gap=0) == [older]
    assert idle_to_reclaim(node, memory_gap=30, slots_gap=0) == [older, newer]
    assert idle_to_reclaim(node, memory_gap=0, slots_gap=2) == [older, newer]
    assert idle_to_reclaim(node, memory_gap=197, slots_gap=0) is None      # 196 B is all there is
    assert idle_to_reclaim(node, memory_gap=0, slots_gap=3) is None
