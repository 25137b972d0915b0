"""Startup-time-aware placement (ServerlessLLM §5.1) inside SLINFER's order, and its grace.

Round numbers: a 10 kB model reads from disk at 10 kB/s (1 s) and copies host → device at
100 kB/s (0.1 s), so a cold start costs 1 s from disk and 0.1 s from the host cache.
"""
from dataclasses import replace

import pytest

from scheduler import (ColdStartGrace, CreateInstance, KvResize, Load, LoadBandwidths, MemoryDone,
                       ModelTierChanged, RequestArrived)
from scheduler.admission import ShadowValidator
from scheduler.estimate import Estimator
from scheduler.kv import OutputEstimator
from scheduler.startup import StartupEstimator
from scheduler.state import Instance, Node, Request
from sched_builders import EXACT, TABLE, make_scheduler, model, node_spec, ready_instance, \
    request_due

BW = LoadBandwidths(disk_to_host=10_000.0, host_to_device=100_000.0, peer_to_device=50_000.0)
WEIGHT = 10_000
MEMORY = 1_000_000


def gpu(node_id, host=None):
    return node_spec(node_id, memory=MEMORY, host=host, bandwidths=BW)


def scheduler(nodes, config=EXACT, names=("m", "other")):
    return make_scheduler(config, models=[model(n, weight=WEIGHT) for n in names], nodes=nodes)


def only(actions, cls):
    (found,) = [a for a in actions if isinstance(a, cls)]
    return found


def created_on(actions):
    return only(actions, CreateInstance).node


def occupy(sched, node_id, t=0.0):
    """A running instance of "other" on `node_id`, which puts the node first in packing order."""
    acts = sched.handle(RequestArrived("busy", "other", 16, 100, t), t)
    assert created_on(acts) == node_id
    iid = only(acts, CreateInstance).instance
    acts = sched.handle(MemoryDone(iid, only(acts, Load).action_id, 1.0), t + 1.0)
    sched.handle(MemoryDone(iid, only(acts, KvResize).action_id, 0.0), t + 1.0)


# -- the estimate: queue + bytes ÷ bandwidth of the tier path ----------------------------------

def test_estimate_is_queue_plus_bytes_over_the_slowest_hop():
    node, m = Node(gpu("g0")), model(weight=WEIGHT)
    startup = StartupEstimator()
    disk = startup.estimate(node, m, now=0.0)
    assert (disk.source, disk.queue, disk.transfer) == ("disk", 0.0, 1.0)   # min(disk, H2D)
    startup.tier_changed("g0", "m", "host")
    host = startup.estimate(node, m, now=0.0)
    assert (host.source, host.seconds) == ("host", 0.1)
    queued = Instance("q", m, node, TABLE, created=0.0, ready_at=1.0)
    startup.plan(queued)                                     # a load planned to end at 1.0
    later = startup.estimate(node, m, now=0.25)
    assert (later.queue, later.seconds) == (0.75, 0.85)
    startup.finished(queued)
    assert startup.estimate(node, m, now=0.25).queue == 0.0


def test_a_peer_serving_the_model_is_a_source_where_the_executor_can_use_it():
    a, b, m = Node(gpu("g0")), Node(gpu("g1")), model(weight=WEIGHT)
    serving = ready_instance(b, "m@g1", m, weights=WEIGHT)
    startup = StartupEstimator()
    peer = startup.estimate(a, m, 0.0, [serving])
    assert (peer.source, peer.seconds) == ("peer", 0.2)
    assert startup.estimate(b, m, 0.0, [serving]).source == "disk"     # not its own peer
    startup.tier_changed("g0", "m", "host")
    assert startup.estimate(a, m, 0.0, [serving]).source == "host"     # 0.1 s beats 0.2 s
    no_peer = Node(node_spec("g2", bandwidths=replace(BW, peer_to_device=None)))
    assert startup.estimate(no_peer, m, 0.0, [serving]).source == "disk"


def test_no_measured_bandwidths_no_estimate():
    assert StartupEstimator().estimate(Node(node_spec()), model(), 0.0) is None


# -- placement: earliest start-up among passing nodes, packing order among equals --------------

def test_host_cached_node_wins_over_the_first_node_in_packing_order():
    # Fig.-style: g0 is busy (first in bin-packing order), g1 is empty (last) but holds the model
    # in its host cache; both pass validation, so the earlier start-up (0.1 s vs 1 s) wins
    sched = scheduler([gpu("g0"), gpu("g1")])
    occupy(sched, "g0")
    sched.handle(ModelTierChanged("g1", "m", "host"), 1.0)
    assert created_on(sched.handle(RequestArrived("r", "m", 16, 4, 1.0), 1.0)) == "g1"


@pytest.mark.parametrize("tier_event, config", [
    (None, EXACT),                                           # both on disk: equal start-ups
    (ModelTierChanged("g1", "m", "host"), replace(EXACT, startup_aware=False)),
    (ModelTierChanged("g1", "m", "host"), replace(EXACT, startup_tolerance=1.0)),
])
def test_packing_decides_between_equal_start_ups(tier_event, config):
    sched = scheduler([gpu("g0"), gpu("g1")], config)
    occupy(sched, "g0")
    if tier_event is not None:
        sched.handle(tier_event, 1.0)
    assert created_on(sched.handle(RequestArrived("r", "m", 16, 4, 1.0), 1.0)) == "g0"


@pytest.mark.parametrize("shared_host, expected", [(None, "g1"), ("box", "g0")])
def test_a_queued_load_counts_only_on_its_own_host(shared_host, expected):
    # "other" starts loading on g0 (1 s from disk); "m" right after would wait behind it on g0:
    # 2 s there vs 1 s on the empty g1 — unless both devices read from the same machine's disk
    sched = scheduler([gpu("g0", shared_host), gpu("g1", shared_host)])
    assert created_on(sched.handle(RequestArrived("r0", "other", 16, 100, 0.0), 0.0)) == "g0"
    assert created_on(sched.handle(RequestArrived("r1", "m", 16, 100, 0.0), 0.0)) == expected


def test_a_node_that_fails_validation_is_skipped_whatever_its_start_up():
    small = node_spec("g1", memory=WEIGHT, bandwidths=BW)   # the weights fit, the KV does not
    sched = scheduler([gpu("g0"), small])
    sched.handle(ModelTierChanged("g1", "m", "host"), 0.0)
    assert created_on(sched.handle(RequestArrived("r", "m", 16, 4, 0.0), 0.0)) == "g0"


# -- the estimate becomes the grace -------------------------------------------------------------

def cold_start(sched, load_done_at):
    """r1 at t=0 on a model cached in host memory (estimate 0.1 s); returns its grace."""
    sched.handle(ModelTierChanged("g0", "m", "host"), 0.0)
    acts = sched.handle(RequestArrived("r1", "m", 16, 4, 0.0), 0.0)
    iid = only(acts, CreateInstance).instance
    assert sched.requests["r1"].grace == pytest.approx(0.1)    # promised at placement
    acts = sched.handle(MemoryDone(iid, only(acts, Load).action_id, load_done_at), load_done_at)
    acts = sched.handle(MemoryDone(iid, only(acts, KvResize).action_id, 0.05), load_done_at + 0.05)
    return only(acts, ColdStartGrace).seconds


def test_grace_equals_the_estimate_when_the_load_takes_what_was_estimated():
    assert cold_start(scheduler([gpu("g0")]), 0.1) == pytest.approx(0.1)


def test_grace_is_bounded_by_the_actual_wait_and_by_the_promise():
    assert cold_start(scheduler([gpu("g0")]), 0.06) == pytest.approx(0.06)   # early: what it waited
    assert cold_start(scheduler([gpu("g0")]), 0.3) == pytest.approx(0.1)     # late: the promise


def test_a_request_joining_a_loading_instance_is_promised_the_remaining_start_up():
    sched = scheduler([gpu("g0")])
    acts = sched.handle(RequestArrived("r1", "m", 16, 4, 0.0), 0.0)          # disk: 1 s
    iid, load = only(acts, CreateInstance).instance, only(acts, Load)
    sched.handle(RequestArrived("r2", "m", 16, 4, 0.4), 0.4)
    assert sched.requests["r2"].instance.id == iid
    assert sched.requests["r2"].grace == pytest.approx(0.6)
    acts = sched.handle(MemoryDone(iid, load.action_id, 0.8), 0.8)           # 0.2 s early
    acts = sched.handle(MemoryDone(iid, only(acts, KvResize).action_id, 0.0), 0.8)
    graces = {a.request_id: a.seconds for a in acts if isinstance(a, ColdStartGrace)}
    assert graces == pytest.approx({"r1": 0.8, "r2": 0.4})


def test_without_bandwidths_the_grace_is_the_measured_cold_start():
    sched = make_scheduler(EXACT, models=[model(weight=WEIGHT)], nodes=[node_spec(memory=MEMORY)])
    acts = sched.handle(RequestArrived("r1", "m", 16, 4, 0.0), 0.0)
    iid = only(acts, CreateInstance).instance
    assert sched.requests["r1"].grace == 0.0
    acts = sched.handle(MemoryDone(iid, only(acts, Load).action_id, 0.5), 0.5)
    acts = sched.handle(MemoryDone(iid, only(acts, KvResize).action_id, 0.1), 0.6)
    assert only(acts, ColdStartGrace).seconds == pytest.approx(0.6)


# -- shadow validation releases a cold prefill at its estimated readiness ------------------------

def validator(shadow):
    config = replace(EXACT, shadow=shadow)
    return ShadowValidator(config, Estimator(config), OutputEstimator(220))


def cold_target(neighbour_tokens, neighbour_deadline):
    """A loaded neighbour with a waiting prompt; a cold target estimated ready at 0.5 s; R of 100
    tokens (0.1 s prefill, TTFT 0.5 s) arriving at 0, so due at 0.5 + 0.5 = 1.0 s."""
    node = Node(node_spec())
    neighbour = ready_instance(node, "x")
    request_due("x1", neighbour_deadline, neighbour, prefilled=False,
                input_tokens=neighbour_tokens)
    target = Instance("t", model(), node, TABLE, created=0.0, ready_at=0.5)
    return target, Request("R", "m", 100, 50, 0.0, 0.5, 0.25)


@pytest.mark.parametrize("shadow", ["edf", "full"])
def test_the_node_runs_other_prefills_while_the_target_loads(shadow):
    # the neighbour's 0.4 s prompt runs in the load gap; R starts at 0.5 and ends at 0.6 ≤ 1.0
    target, r = cold_target(400, neighbour_deadline=2.0)
    assert validator(shadow).admit(target, r, now=0.0)


@pytest.mark.parametrize("shadow", ["edf", "full"])
def test_a_prefill_started_during_the_load_can_make_the_cold_request_late(shadow):
    # nothing else is eligible while the target loads, so the neighbour's 0.95 s prompt starts at
    # once and R can only follow at 0.95: 1.05 > 1.0. (A walk that ignored the load would run R
    # first by deadline and accept.)
    target, r = cold_target(950, neighbour_deadline=1.3)
    assert not validator(shadow).admit(target, r, now=0.0)
