"""Live migration (ServerlessLLM §4) in the scheduler: the cost against drop-and-re-prefill, and a
preemption that moves its victim's running request by rounds and a hand-over instead of evicting it.

The scene, on two CPU nodes with TPOT 0.2 s (decode: 50 ms + 20 ms per sequence): `m@c0` decodes 4
requests (slice 0.65), its neighbour `v@c0` one (slice 0.35). A fifth request for m would take c0 to
1.1, so v@c0, the smaller batch, is preempted (§4.4.1); its request has 120 tokens of context and
moves to a new instance on c1.
"""
from dataclasses import replace

import pytest

from sched_builders import EXACT, TABLE, make_scheduler, model, node_spec, ready_instance
from scheduler import (Assign, CreateInstance, Evict, Grant, HandOver, InstanceFailed, KvResize,
                       Load, MemoryDone, Migrate, ReleaseInstance, RequestArrived, StepFinished,
                       Unload)
from scheduler import migration
from scheduler.costmodel import LatencyTable
from scheduler.estimate import Estimator
from scheduler.slo import SloPolicy
from scheduler.state import Instance, Node, Request

CONFIG = replace(EXACT, slo=SloPolicy(tpot=0.2), migration=True)
NOW = 1.0


def kinds(actions):
    return [type(a).__name__ for a in actions]


def only(actions, cls):
    (found,) = [a for a in actions if isinstance(a, cls)]
    return found


def serving(sched, node_id: str, name: str, spec, requests: list[Request]):
    """An instance already loaded on `node_id`, decoding `requests`, known to the scheduler."""
    inst = ready_instance(sched.nodes[node_id], name, spec)
    sched.life.instances[name] = inst
    sched.life.by_model.setdefault(spec.name, []).append(inst)
    for r in requests:
        sched.life.requests[r.id] = r
        inst.attach(r)
        inst.mark_prefilled(r)
    inst.kv_used = sum(spec.blocks_for(r.context) for r in requests)
    return inst


def running(rid: str, model_name: str, input_tokens: int = 16, generated: int = 4) -> Request:
    return Request(rid, model_name, input_tokens, 200, 0.0, 0.5, 0.2, generated=generated)


@pytest.fixture
def scene():
    """(scheduler, victim instance, the actions of the arrival that preempts it)."""
    m, v = model("m"), model("v")
    sched = make_scheduler(CONFIG, models=[m, v],
                           nodes=[node_spec("c0", kind="cpu"), node_spec("c1", kind="cpu")])
    serving(sched, "c0", "m@c0", m, [running(f"m{k}", "m", generated=20) for k in range(4)])
    victim = serving(sched, "c0", "v@c0", v, [running("moving", "v", input_tokens=100, generated=20)])
    acts = sched.handle(RequestArrived("new", "m", 16, 8, NOW), NOW)
    return sched, victim, acts


def load_destination(sched, acts, t=NOW):
    """The new destination loads and sizes its KV; returns (its id, the actions that follow)."""
    dest = only(acts, CreateInstance).instance
    acts = sched.handle(MemoryDone(dest, only(acts, Load).action_id, 0.2), t + 0.2)
    acts = sched.handle(MemoryDone(dest, only(acts, KvResize).action_id, 0.01), t + 0.21)
    return dest, acts


def source_steps(sched, victim, grant, n, t, done=True):
    """`n` decode steps of the victim's request on the source under `grant`."""
    acts = []
    for k in range(n):
        acts += sched.handle(StepFinished(victim.id, grant.grant_id, "decode", ("moving",), (), 9,
                                          0.07, done and k == n - 1), t)
    return acts


def test_the_plan_rounds_converge_and_the_pause_is_the_last_gap():
    est = Estimator(EXACT)
    node = Node(node_spec("c0", kind="cpu"))
    source, dest = ready_instance(node, "src"), ready_instance(Node(node_spec("c1", kind="cpu")), "dst")
    req = running("r", "m", input_tokens=980, generated=20)       # 1,000 tokens of context
    source.attach(req)
    # round 1: 1 s of prefill, while the source (70 ms a token) makes 15 more; round 2: 15 ms, 1 more
    plan = migration.plan(req, source, dest, est, CONFIG)
    assert (plan.rounds, plan.duration) == (2, pytest.approx(1.0 + 0.015))
    assert plan.pause == pytest.approx(0.002) and plan.reprefill_pause == pytest.approx(1.0)
    assert migration.beats_reprefill(plan, running("p", "m"), dest, 0.0, est)
    late = Request("p", "m", 16, 8, 0.0, 0.5, 0.2)                # first token due at 0.5 s
    assert not migration.beats_reprefill(plan, late, dest, 0.0, est)


def test_no_plan_when_the_destination_prefills_slower_than_the_source_decodes():
    slow = LatencyTable("tiny", "dev", (1.0, 4096.0), (0.5, 0.5 * 4096), TABLE.decode_rows)
    node = Node(node_spec("c0", kind="cpu"))
    source = ready_instance(node, "src")
    dest = Instance("dst", model(), Node(node_spec("c1", kind="cpu")), slow, 0.0)
    req = running("r", "m", input_tokens=100)
    source.attach(req)
    assert migration.plan(req, source, dest, Estimator(EXACT), CONFIG) is None


def test_preemption_migrates_the_running_request_instead_of_evicting_it(scene):
    sched, victim, acts = scene
    assert "Evict" not in kinds(acts)
    assert only(acts, CreateInstance).node == "c1"
    assert only(acts, Assign).request_id == "new"                  # the preemptor joins m@c0
    moving = sched.requests["moving"]
    assert moving.instance is victim and victim.retired           # still decoding on the source
    source_grant = only([a for a in acts if a.instance == victim.id], Grant)

    dest, acts = load_destination(sched, acts)
    # the destination's first prefill grant carries round 1: all 120 tokens so far
    assert kinds(acts) == ["Migrate", "Grant"]
    assert only(acts, Migrate) == Migrate("moving", victim.id, dest, 120)
    dest_grant = only(acts, Grant)
    assert dest_grant.kind == "prefill"

    # the source produced two tokens meanwhile: a gap of 2 ≤ 4, so the round hands over, as soon
    # as the source is between steps (it holds c0's grant again)
    source_grant = only(source_steps(sched, victim, source_grant, 2, NOW + 0.3), Grant)
    acts = sched.handle(StepFinished(dest, dest_grant.grant_id, "prefill", (), (), 8, 0.12, True,
                                     caught_up=("moving",)), NOW + 0.35)
    assert "HandOver" not in kinds(acts) and victim.computing
    acts = source_steps(sched, victim, source_grant, 1, NOW + 0.37)
    handover = only(acts, HandOver)
    assert (handover.instance, handover.request_id, handover.destination) == (victim.id, "moving", dest)
    assert "Grant" not in kinds(acts) or only(acts, Grant).instance != victim.id

    acts = sched.handle(MemoryDone(victim.id, handover.action_id, 0.001), NOW + 0.38)
    assert moving.instance.id == dest and moving.generated == 23 and not moving.prefilled
    assert "moving" not in victim.requests and not sched.life.instances[dest].incoming
    assert only(acts, Grant).instance == dest                      # its prefill of the last gap
    assert "Migrate" not in kinds(acts) and "Assign" not in kinds(acts)
    unload = only(acts, Unload)                                   # the emptied victim goes away
    acts = sched.handle(MemoryDone(victim.id, unload.action_id, 0.01), NOW + 0.4)
    acts = sched.handle(MemoryDone(victim.id, only(acts, KvResize).action_id, 0.0), NOW + 0.4)
    assert only(acts, ReleaseInstance).instance == victim.id


def test_a_large_gap_takes_another_round(scene):
    sched, victim, acts = scene
    source_grant = only([a for a in acts if a.instance == victim.id], Grant)
    dest, acts = load_destination(sched, acts)
    dest_grant = only(acts, Grant)
    source_grant = only(source_steps(sched, victim, source_grant, 6, NOW + 0.3), Grant)  # gap 6 > 4
    acts = sched.handle(StepFinished(dest, dest_grant.grant_id, "prefill", (), (), 8, 0.12, True,
                                     caught_up=("moving",)), NOW + 0.4)
    assert "HandOver" not in kinds(acts)
    assert only(acts, Migrate).tokens == 126 and only(acts, Grant).instance == dest
    acts = sched.handle(StepFinished(dest, only(acts, Grant).grant_id, "prefill", (), (), 8, 0.01,
                                     True, caught_up=("moving",)), NOW + 0.41)
    acts += source_steps(sched, victim, source_grant, 1, NOW + 0.42)
    assert only(acts, HandOver).request_id == "moving"


def test_a_request_that_finishes_during_the_rounds_calls_the_migration_off(scene):
    sched, victim, acts = scene
    source_grant = only([a for a in acts if a.instance == victim.id], Grant)
    dest, acts = load_destination(sched, acts)
    acts = sched.handle(StepFinished(victim.id, source_grant.grant_id, "decode", ("moving",),
                                     ("moving",), 0, 0.07, True), NOW + 0.3)
    assert "moving" not in sched.requests and not sched.life.instances[dest].incoming
    assert "Unload" in kinds(acts)                                # the victim emptied: it goes


def test_a_request_that_finishes_before_its_hand_over_withdraws_it(scene):
    sched, victim, acts = scene
    source_grant = only([a for a in acts if a.instance == victim.id], Grant)
    dest, acts = load_destination(sched, acts)
    source_grant = only(source_steps(sched, victim, source_grant, 1, NOW + 0.3), Grant)
    sched.handle(StepFinished(dest, only(acts, Grant).grant_id, "prefill", (), (), 8, 0.12, True,
                              caught_up=("moving",)), NOW + 0.35)
    assert len(victim.outbox) == 1                                # the hand-over waits for the source
    acts = sched.handle(StepFinished(victim.id, source_grant.grant_id, "decode", ("moving",),
                                     ("moving",), 0, 0.07, True), NOW + 0.4)
    assert "HandOver" not in kinds(acts) and "Unload" in kinds(acts)


def test_a_destination_that_fails_falls_back_to_drop_and_re_prefill(scene):
    sched, victim, acts = scene
    source_grant = only([a for a in acts if a.instance == victim.id], Grant)
    dest, acts = load_destination(sched, acts)
    acts = sched.handle(InstanceFailed(dest, ()), NOW + 0.3)
    assert not sched.requests["moving"].migration
    evict = only(source_steps(sched, victim, source_grant, 1, NOW + 0.3), Evict)
    assert (evict.instance, evict.requests) == (victim.id, ("moving",))
    acts = sched.handle(MemoryDone(victim.id, evict.action_id, 0.001), NOW + 0.31)
    replaced = [a for a in acts if isinstance(a, Assign) and a.request_id == "moving"]
    assert [a.resume_tokens for a in replaced] == [21]              # the grant in flight made one more


def test_without_migration_the_victim_is_evicted():
    m, v = model("m"), model("v")
    sched = make_scheduler(replace(CONFIG, migration=False), models=[m, v],
                           nodes=[node_spec("c0", kind="cpu"), node_spec("c1", kind="cpu")])
    serving(sched, "c0", "m@c0", m, [running(f"m{k}", "m", generated=20) for k in range(4)])
    serving(sched, "c0", "v@c0", v, [running("moving", "v", input_tokens=100, generated=20)])
    acts = sched.handle(RequestArrived("new", "m", 16, 8, NOW), NOW)
    assert only(acts, Evict).requests == ("moving",) and "CreateInstance" not in kinds(acts)
