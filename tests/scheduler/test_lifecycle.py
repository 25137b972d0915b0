"""Lifecycle (§4.5): cold start and grace, keep-alive, reuse, cancellation, retry and drop; and
an instance the executor lost."""
from scheduler import (Assign, ColdStartGrace, CreateInstance, Drop, Evict, Grant, InstanceFailed,
                       KvResize, Load, MemoryDone, ReleaseInstance, RequestArrived, RequestCancelled,
                       StepFinished, Tick, Unload)
from dataclasses import replace

from sched_builders import EXACT, make_scheduler, model, node_spec, ready_instance
from scheduler.state import Request
from scheduler.slo import SloPolicy


def kinds(actions):
    return [type(a).__name__ for a in actions]


def only(actions, cls):
    (found,) = [a for a in actions if isinstance(a, cls)]
    return found


def cold_start(sched, rid="r1", t=0.0):
    """Arrival → instance created, loaded, KV sized, first grant. Returns (instance id, grant)."""
    acts = sched.handle(RequestArrived(rid, "m", 16, 4, t), t)
    assert kinds(acts) == ["CreateInstance", "Assign", "Load"]
    iid = only(acts, CreateInstance).instance
    acts = sched.handle(MemoryDone(iid, only(acts, Load).action_id, 0.5), t + 0.5)
    resize = only(acts, KvResize)
    assert resize.blocks == 42                       # ⌈33 · 1.25⌉: (16 + 512) tokens, watermark
    acts = sched.handle(MemoryDone(iid, resize.action_id, 0.1), t + 0.6)
    assert only(acts, ColdStartGrace).seconds == 0.5 + 0.1
    return iid, only(acts, Grant)


def finish(sched, iid, grant, rid, t):
    """The request's last step; the idle instance lazily shrinks its KV to M_recommend."""
    acts = sched.handle(StepFinished(iid, grant.grant_id, grant.kind, (rid,), (rid,), 0, 0.01,
                                     True), t)
    shrink = only(acts, KvResize)
    assert shrink.blocks == 5                        # floor of 4 blocks · 1.25
    assert sched.handle(MemoryDone(iid, shrink.action_id, 0.01), t) == []


def test_keep_alive_reclaims_after_one_second():
    sched = make_scheduler()
    iid, grant = cold_start(sched)
    assert grant.kind == "prefill"
    finish(sched, iid, grant, "r1", 1.0)
    assert sched.next_wakeup() == 2.0
    assert sched.handle(Tick(), 1.9) == []
    acts = sched.handle(Tick(), 2.0)
    unload = only(acts, Unload)
    acts = sched.handle(MemoryDone(iid, unload.action_id, 0.1), 2.1)
    shrink = only(acts, KvResize)
    assert shrink.blocks == 0
    acts = sched.handle(MemoryDone(iid, shrink.action_id, 0.0), 2.1)
    assert only(acts, ReleaseInstance).instance == iid
    assert not sched.nodes["g0"].instances


def test_a_request_during_keep_alive_reuses_the_instance():
    sched = make_scheduler()
    iid, grant = cold_start(sched)
    finish(sched, iid, grant, "r1", 1.0)
    acts = sched.handle(RequestArrived("r2", "m", 16, 4, 1.5), 1.5)
    assert kinds(acts) == ["Assign", "KvResize"]      # warm: no load, KV grows back early
    assert only(acts, Assign).instance == iid
    acts = sched.handle(MemoryDone(iid, only(acts, KvResize).action_id, 0.1), 1.6)
    assert only(acts, Grant).kind == "prefill"
    assert "ColdStartGrace" not in kinds(acts)        # no cold start, no grace
    assert sched.handle(Tick(), 2.0) == []           # the old keep-alive no longer applies


def test_cancel_attached_and_queued_requests():
    sched = make_scheduler()
    iid, grant = cold_start(sched)
    sched.handle(RequestCancelled("r1"), 0.7)
    assert "r1" not in sched.requests
    # the executor reports the aborted grant; the instance then idles into keep-alive
    sched.handle(StepFinished(iid, grant.grant_id, "prefill", (), (), 0, 0.0, True), 0.7)
    assert sched.next_wakeup() == 1.7


def test_retry_every_quarter_second_then_drop_at_the_first_token_deadline():
    big = model(weight=20_000)                        # never fits the 10 kB node
    sched = make_scheduler(models=[big])
    assert sched.handle(RequestArrived("r", "m", 16, 4, 0.0), 0.0) == []
    assert sched.next_wakeup() == 0.25
    assert sched.handle(Tick(), 0.25) == []
    assert sched.next_wakeup() == 0.5
    assert sched.handle(Tick(), 0.5) == []            # due at 0.5 s: not yet past
    acts = sched.handle(Tick(), 0.75)
    assert isinstance(acts[0], Drop) and acts[0].request_id == "r"
    assert not sched.requests


def test_a_request_s_own_slos_replace_the_defaults():
    sched = make_scheduler(models=[model(weight=20_000)])   # queued: its deadline decides the drop
    sched.handle(RequestArrived("r", "m", 16, 4, 0.0, ttft_slo=2.0, tpot_slo=1.0), 0.0)
    req = sched.requests["r"]
    assert (req.ttft_slo, req.tpot_slo, req.deadline) == (2.0, 1.0, 2.0)
    assert sched.handle(Tick(), 1.75) == []             # the default 0.5 s would have dropped it
    assert isinstance(sched.handle(Tick(), 2.25)[0], Drop)


def test_the_safety_margin_shrinks_an_override_like_a_default():
    margin = replace(EXACT, slo=SloPolicy(margin=0.05))
    sched = make_scheduler(margin, models=[model(weight=20_000)])
    sched.handle(RequestArrived("r", "m", 16, 4, 0.0, tpot_slo=1.0), 0.0)
    req = sched.requests["r"]
    assert req.ttft_slo == SloPolicy(margin=0.05).ttft(16)   # not overridden: the default
    assert req.tpot_slo == 0.95


def test_cancel_while_queued_is_never_dropped():
    sched = make_scheduler(models=[model(weight=20_000)])
    sched.handle(RequestArrived("r", "m", 16, 4, 0.0), 0.0)
    sched.handle(RequestCancelled("r"), 0.1)
    assert sched.handle(Tick(), 0.25) == [] and sched.handle(Tick(), 0.75) == []


def test_unknown_model_is_dropped_with_a_reason():
    sched = make_scheduler()
    (drop,) = sched.handle(RequestArrived("r", "nope", 16, 4, 0.0), 0.0)
    assert drop == Drop("r", "unknown model")


def test_new_instances_go_to_cpu_first():
    sched = make_scheduler(nodes=[node_spec("g0"), node_spec("c0", kind="cpu")])
    acts = sched.handle(RequestArrived("r", "m", 16, 4, 0.0), 0.0)
    assert only(acts, CreateInstance).node == "c0"


def test_a_failed_load_forgets_the_instance_and_the_next_request_cold_starts():
    sched = make_scheduler()
    acts = sched.handle(RequestArrived("r1", "m", 16, 4, 0.0), 0.0)
    iid = only(acts, CreateInstance).instance
    acts = sched.handle(InstanceFailed(iid, ("r1",)), 0.3)
    assert acts == [ReleaseInstance(iid)]
    assert not sched.requests and not sched.nodes["g0"].instances
    acts = sched.handle(RequestArrived("r2", "m", 16, 4, 0.4), 0.4)
    assert kinds(acts) == ["CreateInstance", "Assign", "Load"]
    assert only(acts, CreateInstance).instance != iid
    assert sched.handle(Tick(), 5.0) == []              # no timer of the dead instance fires


def test_a_failure_mid_grant_frees_the_node_for_its_neighbour():
    sched = make_scheduler(models=[model("m"), model("n")])
    iid, grant = cold_start(sched)
    acts = sched.handle(RequestArrived("s1", "n", 16, 4, 0.6), 0.6)
    other = only(acts, CreateInstance).instance
    acts = sched.handle(MemoryDone(other, only(acts, Load).action_id, 0.1), 0.7)
    acts = sched.handle(MemoryDone(other, only(acts, KvResize).action_id, 0.1), 0.8)
    assert "Grant" not in kinds(acts)                   # m's grant still holds the node's permit
    acts = sched.handle(InstanceFailed(iid, ("r1",)), 0.9)
    assert kinds(acts) == ["ReleaseInstance", "Grant"] and only(acts, Grant).instance == other
    assert set(sched.requests) == {"s1"}


def test_requests_a_failed_instance_was_evicting_are_placed_again():
    sched = make_scheduler(nodes=[node_spec(memory=10 + 42 * 16)])   # no room for the KV to grow
    iid, grant = cold_start(sched)
    acts = sched.handle(StepFinished(iid, grant.grant_id, "prefill", ("r1",), (), 42, 0.01, True),
                        0.7)
    acts = sched.handle(MemoryDone(iid, only(acts, KvResize).action_id, 0.01), 0.7)
    assert only(acts, Evict).requests == ("r1",)        # underestimated KV, no room to grow
    acts = sched.handle(InstanceFailed(iid, ()), 0.8)   # the executor had already let r1 go
    assert kinds(acts) == ["ReleaseInstance", "CreateInstance", "Assign", "Load"]
    assert only(acts, Assign) == Assign("r1", only(acts, CreateInstance).instance, 16, 1)


def idle_m_beside_room_for_one(memory=600):
    """Models m and n on a node that holds one instance with a request; m served r1 and is idle
    (kept alive, KV shrunk to 5 blocks) at t = 1.0. Returns (scheduler, m's instance id)."""
    sched = make_scheduler(models=[model("m"), model("n")], nodes=[node_spec(memory=memory)])
    acts = sched.handle(RequestArrived("r1", "m", 16, 4, 0.0), 0.0)
    iid = only(acts, CreateInstance).instance
    acts = sched.handle(MemoryDone(iid, only(acts, Load).action_id, 0.5), 0.5)
    acts = sched.handle(MemoryDone(iid, only(acts, KvResize).action_id, 0.1), 0.6)
    grant = only(acts, Grant)
    acts = sched.handle(StepFinished(iid, grant.grant_id, grant.kind, ("r1",), ("r1",), 0, 0.01,
                                     True), 1.0)
    assert sched.handle(MemoryDone(iid, only(acts, KvResize).action_id, 0.01), 1.0) == []
    return sched, iid


def test_an_idle_instance_gives_way_to_a_new_model_that_needs_its_memory():
    """n needs 10 + 33 · 16 bytes; beside idle m (90 bytes) that is 628 of 600. Before, n waited
    out m's keep-alive and, with a keep-alive longer than its first-token deadline, was dropped
    (found serving two models with --keep-alive 30 where one fits)."""
    sched, m_id = idle_m_beside_room_for_one()
    acts = sched.handle(RequestArrived("r2", "n", 16, 4, 1.2), 1.2)
    assert kinds(acts) == ["CreateInstance", "Assign", "Unload", "Load"]
    n_id, n_load = only(acts, CreateInstance).instance, only(acts, Load)
    assert only(acts, Unload).instance == m_id
    acts = sched.handle(MemoryDone(m_id, only(acts, Unload).action_id, 0.05), 1.25)
    m_kv = only(acts, KvResize)
    assert (m_kv.instance, m_kv.blocks) == (m_id, 0)
    acts = sched.handle(MemoryDone(n_id, n_load.action_id, 0.3), 1.5)
    assert acts == []                                # n's KV waits for m's to go
    acts = sched.handle(MemoryDone(m_id, m_kv.action_id, 0.0), 1.5)
    assert only(acts, ReleaseInstance).instance == m_id
    n_kv = only(acts, KvResize)
    assert (n_kv.instance, n_kv.blocks) == (n_id, 36)    # all the node has (M_recommend: 42)
    acts = sched.handle(MemoryDone(n_id, n_kv.action_id, 0.05), 1.55)
    assert only(acts, Grant).instance == n_id
    assert sched.handle(Tick(), 2.0) == []           # m's keep-alive timer finds it gone


def test_an_idle_instance_stays_when_the_new_model_fits_beside_it():
    sched, m_id = idle_m_beside_room_for_one(memory=700)
    acts = sched.handle(RequestArrived("r2", "n", 16, 4, 1.2), 1.2)
    assert kinds(acts) == ["CreateInstance", "Assign", "Load"]
    assert m_id in sched.nodes["g0"].instances


def test_a_busy_instance_does_not_give_way():
    sched, m_id = idle_m_beside_room_for_one()
    sched.handle(RequestArrived("r3", "m", 16, 4, 1.1), 1.1)       # m is serving again
    acts = sched.handle(RequestArrived("r2", "n", 16, 4, 1.2), 1.2)
    assert "Unload" not in kinds(acts) and "CreateInstance" not in kinds(acts)


def test_a_cancelled_request_s_blocks_leave_its_instance_s_count():
    """The executor aborts a cancelled request and has no step to report the freed KV by, so its
    blocks leave the count here. Kept, they held instance A, 700 blocks, above a 4,000-token
    prompt's room for good: 501 stale + 251 > 700, so no grant, hence no step to correct it."""
    a_spec, b_spec = model("a", max_context=8192), model("b", max_context=8192)
    sched = make_scheduler(models=[a_spec, b_spec], nodes=[node_spec(memory=100_000)])
    node = sched.nodes["g0"]
    a, b = ready_instance(node, "A", a_spec, kv_blocks=700), ready_instance(node, "B", b_spec)
    for inst in (a, b):
        sched.life.instances[inst.id] = inst
        sched.life.by_model[inst.model.name] = [inst]
    long = Request("long", "a", 8000, 1000, 0.0, 10.0, 0.25)
    a.attach(long)
    a.mark_prefilled(long)
    a.kv_used = a_spec.blocks_for(8000)
    sched.life.requests["long"] = long
    b.computing, node.grant_instance = True, b          # B steps meanwhile: A waits for the permit
    sched.handle(RequestCancelled("long"), 1.0)
    assert a.kv_used == 0
    assert only(sched.handle(RequestArrived("next", "a", 4000, 100, 1.1), 1.1), Assign).instance == "A"
    acts = sched.handle(StepFinished("B", 1, "decode", (), (), 0, 0.07, True), 1.2)
    assert only(acts, Grant).instance == "A"


def test_a_cancelled_request_teaches_the_output_estimate_nothing():
    sched = make_scheduler()
    iid, grant = cold_start(sched)
    prior = sched.life.outputs.mean("m")
    sched.handle(StepFinished(iid, grant.grant_id, "prefill", ("r1",), (), 2, 0.02, True), 0.62)
    sched.handle(RequestCancelled("r1"), 0.7)           # after 1 of its 4 tokens
    assert sched.life.outputs.mean("m") == prior
