"""Live migration of a preemption victim's requests (ServerlessLLM) instead of drop-and-re-prefill.

Round numbers (`sched_builders.TABLE`): a prefill costs 1 ms per token, a decode step 50 ms +
20 ms per sequence; TPOT 0.25 s. Node g0 holds the victim V (model "a", one decoding request r)
and the target T (model "b", two requests) that a 2,048-token request q can join only once V's
memory is free; g1 holds a warm instance D of model "a".
"""
from dataclasses import replace

import pytest

from scheduler import (CreateInstance, Evict, Grant, HandedOver, HandOver, InstanceFailed, Load,
                       Migrate, RequestArrived, StepFinished, Unload)
from scheduler.admission import ShadowValidator
from scheduler.estimate import Estimator
from scheduler.kv import OutputEstimator
from scheduler.migration import Migrator, move_cost
from scheduler.state import Instance, Node, Request
from scheduler.tokensched import kv_blocks_needed
from sched_builders import EXACT, TABLE, make_scheduler, model, node_spec

CONFIG = replace(EXACT, migration=True)
MEMORY = 6_000
A, B = model("a", weight=1_000), model("b", weight=1_000)


def warm(node: Node, iid: str, spec, kv_blocks: int = 100) -> Instance:
    inst = Instance(iid, spec, node, TABLE, created=0.0, ready_once=True)
    inst.weights.target = inst.weights.actual = inst.weights.physical = spec.weight_bytes
    inst.kv.target = inst.kv.actual = inst.kv.physical = kv_blocks
    node.instances[iid] = inst
    return inst


def decoding(inst: Instance, rid: str, deadline: float, context: int) -> Request:
    """A prefilled request of `context` tokens whose next token is due at `deadline`."""
    req = Request(rid, inst.model.name, context, 500, deadline - 0.5, 0.5, 0.25)
    inst.attach(req)
    inst.mark_prefilled(req)
    inst.kv_used += inst.model.blocks_for(context)
    return req


def arriving(rid="q", tokens=2048, now=0.0) -> Request:
    return Request(rid, "b", tokens, 50, now, EXACT.slo.ttft(tokens), EXACT.slo.tpot_slo)


def cluster(r_deadline=0.05, d_memory=MEMORY, d_kv=100):
    g0, g1 = Node(node_spec("g0", memory=MEMORY)), Node(node_spec("g1", memory=d_memory))
    victim, target = warm(g0, "V", A), warm(g0, "T", B, kv_blocks=80)
    dest = warm(g1, "D", A, kv_blocks=d_kv)
    r = decoding(victim, "r", r_deadline, 1000)
    for k in range(2):
        decoding(target, f"t{k}", 5.0, 100)
    return victim, target, dest, r


def chooser(victim, target, q, dest, config=CONFIG):
    validator = ShadowValidator(config, Estimator(config), OutputEstimator(220))
    return Migrator(config, validator).chooser(victim, target, q, [victim, dest], now=0.0)


# -- the cost model -------------------------------------------------------------------------------

def test_the_cost_of_a_move():
    victim, _, dest, r = cluster()
    cost = move_cost(r, victim, dest, Estimator(EXACT))
    assert cost.rebuild == pytest.approx(1.0)          # 1,000 tokens re-prefilled on D
    assert cost.gap == 15                              # ⌈1.0 / 0.07⌉ tokens decoded meanwhile
    assert cost.catch_up == pytest.approx(0.015)       # the only pause the client sees
    assert cost.drop(r, 0.0) == pytest.approx((0.95, 1.0))        # late, stopped for 1 s
    assert cost.migrate(r, 0.0, 0.25) == pytest.approx((0.0, 0.015))


# -- the decision ----------------------------------------------------------------------------------

@pytest.mark.parametrize("r_deadline, why", [
    (0.05, "a re-prefill would make r 0.95 s late; q can wait 1 s within its 4 s"),
    (5.0, "on time either way, but r's stream stops for 15 ms instead of 1 s"),
])
def test_migrates_when_that_is_cheaper(r_deadline, why):
    victim, target, dest, r = cluster(r_deadline)
    assert chooser(victim, target, arriving(tokens=2048), dest)(r) is dest, why


@pytest.mark.parametrize("r_deadline, q_tokens, why", [
    (0.5, 100, "q would be 0.6 s late waiting, more than r's 0.5 s under drop"),
    (5.0, 100, "q would be late waiting while r is on time under drop"),
])
def test_drops_and_re_prefills_when_that_costs_no_more(r_deadline, q_tokens, why):
    victim, target, dest, r = cluster(r_deadline)
    assert chooser(victim, target, arriving(tokens=q_tokens), dest)(r) is None, why


def test_needs_a_warm_destination_that_admits_the_rebuild():
    victim, target, dest, r = cluster(d_memory=1_160, d_kv=10)   # no room for r's 95 blocks
    assert chooser(victim, target, arriving(), dest)(r) is None


def test_only_prefilled_requests_and_only_when_enabled():
    victim, target, dest, r = cluster()
    assert chooser(victim, target, arriving(), dest, EXACT) is None          # option off
    r.prefilled = False
    assert chooser(victim, target, arriving(), dest)(r) is None              # nothing to move


def test_a_compute_victim_migrates_when_enabled():
    """A CPU victim keeps its decode time while draining, as a GPU one keeps its memory: the same
    cost decides, the preempting request waiting for the rebuild either way."""
    cpu = Node(node_spec("c0", kind="cpu", memory=MEMORY))
    _, target, dest, _ = cluster()
    victim = warm(cpu, "Vc", A)
    r = decoding(victim, "rc", 0.05, 1000)
    assert chooser(victim, target, arriving(), dest) is None
    both = replace(CONFIG, migration_compute_victims=True)
    assert chooser(victim, target, arriving(), dest, both)(r) is dest


def test_a_destination_still_loading_costs_its_start_up():
    victim, _, dest, r = cluster()
    dest.weights.physical = 0                          # still loading, ready in 0.5 s
    dest.ready_at = 0.5
    cost = move_cost(r, victim, dest, Estimator(EXACT), now=0.0)
    assert (cost.start_up, cost.ready, cost.gap) == (0.5, pytest.approx(1.5), 22)  # ⌈1.5/0.07⌉
    assert cost.migrate(r, 0.0, 0.25) == pytest.approx((0.0, 0.022))


# -- the lifecycle, through the scheduler ---------------------------------------------------------

def only(actions, cls):
    (found,) = [a for a in actions if isinstance(a, cls)]
    return found


def scheduler_with_cluster(config=CONFIG, warm_destination=True, g0_memory=MEMORY):
    sched = make_scheduler(config, models=[A, B], nodes=[node_spec("g0", memory=g0_memory),
                                                         node_spec("g1", memory=MEMORY)])
    victim, target, dest, r = cluster()
    for inst in (victim, target, dest) if warm_destination else (victim, target):
        node = sched.nodes[inst.node.id]
        inst.node = node
        node.instances[inst.id] = inst
        sched.life.instances[inst.id] = inst
        sched.life.by_model.setdefault(inst.model.name, []).append(inst)
        sched.life.requests.update(inst.requests)
    return sched, victim, target, dest, r


def preempt_by_migration(sched, victim, dest):
    acts = sched.handle(RequestArrived("q", "b", 2048, 50, 0.0), 0.0)
    assert only(acts, Migrate) == Migrate("r", "V", "D")
    assert not [a for a in acts if isinstance(a, Evict)]          # r is not dropped
    rebuild = next(a for a in acts if isinstance(a, Grant) and a.instance == "D")
    source = next(a for a in acts if isinstance(a, Grant) and a.instance == "V")
    assert (rebuild.kind, source.kind) == ("prefill", "decode")   # V keeps decoding r
    assert victim.draining and victim not in sched.life.by_model["a"]
    return rebuild, source


def test_a_migration_rebuilds_hands_over_between_grants_then_unloads_the_victim():
    sched, victim, target, dest, r = scheduler_with_cluster()
    rebuild, source = preempt_by_migration(sched, victim, dest)
    acts = sched.handle(StepFinished("D", rebuild.grant_id, "prefill", (), (), 63, 1.0, True), 1.0)
    assert not [a for a in acts if isinstance(a, HandOver)]       # V is still computing
    generated = r.generated
    acts = sched.handle(StepFinished("V", source.grant_id, "decode", ("r",), (), 63, 0.07, True),
                        1.07)
    assert only(acts, HandOver) == HandOver("r", "V", "D")
    assert r.instance is dest and r.prefilled and r.generated == generated + 1
    assert victim.retired and only(acts, Unload).instance == "V"  # its memory goes to q next
    assert next(a for a in acts if isinstance(a, Grant)).instance == "D"   # r decodes on D


def handed_over(sched, victim, dest, r) -> float:
    """Run the migration up to its hand-over; the time it happened."""
    return hand_over(sched, *preempt_by_migration(sched, victim, dest))


def hand_over(sched, rebuild, source) -> float:
    """D's rebuild and V's decode grant end: the hand-over; the time it happened."""
    sched.handle(StepFinished("D", rebuild.grant_id, "prefill", (), (), 63, 1.0, True), 1.0)
    acts = sched.handle(StepFinished("V", source.grant_id, "decode", ("r",), (), 63, 0.07, True), 1.07)
    assert only(acts, HandOver) == HandOver("r", "V", "D")
    return 1.07


def test_the_token_a_hand_over_made_counts_as_a_step_of_the_destination():
    """The catch-up prefill sampled r's next token: r and D account for it as for a step's, and D's
    KV is what the executor reports; no grant was running, so none is released."""
    sched, victim, target, dest, r = scheduler_with_cluster()
    t = handed_over(sched, victim, dest, r)
    generated, context, busy = r.generated, dest.context_tokens, dest.busy_time
    grant = dest.node.grant_instance
    sched.handle(HandedOver("D", "r", True, False, 66, 0.02), t + 0.02)
    assert r.generated == generated + 1 and dest.context_tokens == context + 1
    assert dest.kv_used == 66 and dest.busy_time == pytest.approx(busy + 0.02)
    assert dest.node.grant_instance is grant and r.instance is dest


def test_a_hand_over_whose_token_ends_the_request_finishes_it():
    sched, victim, target, dest, r = scheduler_with_cluster()
    t = handed_over(sched, victim, dest, r)
    sched.handle(HandedOver("D", "r", True, True, 3, 0.02), t + 0.02)
    assert "r" not in sched.requests and "r" not in dest.requests


def test_a_hand_over_that_made_no_token_changes_only_the_kv():
    sched, victim, target, dest, r = scheduler_with_cluster()
    t = handed_over(sched, victim, dest, r)
    generated = r.generated
    sched.handle(HandedOver("D", "r", False, False, 64, 0.0), t)
    assert r.generated == generated and dest.kv_used == 64 and r.instance is dest


def test_a_request_ending_before_its_hand_over_drops_the_rebuild():
    sched, victim, target, dest, r = scheduler_with_cluster()
    rebuild, source = preempt_by_migration(sched, victim, dest)
    acts = sched.handle(StepFinished("V", source.grant_id, "decode", ("r",), ("r",), 0, 0.07,
                                     True), 0.07)
    assert "r" not in dest.copies and victim.retired and only(acts, Unload).instance == "V"
    assert not [a for a in acts if isinstance(a, Evict)]          # D is busy rebuilding
    acts = sched.handle(StepFinished("D", rebuild.grant_id, "prefill", (), (), 63, 1.0, True), 1.0)
    assert only(acts, Evict).requests == ("r",) and only(acts, Evict).instance == "D"
    assert not [a for a in acts if isinstance(a, HandOver)]


def test_a_failed_destination_leaves_the_request_at_its_source():
    sched, victim, target, dest, r = scheduler_with_cluster()
    rebuild, source = preempt_by_migration(sched, victim, dest)
    sched.handle(InstanceFailed("D", ()), 0.5)
    assert r.copy_at is None and r.instance is victim and "r" not in sched.life.migrating
    acts = sched.handle(StepFinished("V", source.grant_id, "decode", ("r",), (), 63, 0.07, True),
                        0.57)
    assert not [a for a in acts if isinstance(a, HandOver)]
    assert next(a for a in acts if isinstance(a, Grant)).instance == "V"    # r carries on


def test_with_cold_destinations_the_move_starts_an_instance_elsewhere():
    """ServerlessLLM loads the destination first; the source streams through the load."""
    sched, victim, target, _, r = scheduler_with_cluster(
        replace(CONFIG, migration_cold_destinations=True), warm_destination=False)
    acts = sched.handle(RequestArrived("q", "b", 2048, 50, 0.0), 0.0)
    created = only(acts, CreateInstance)
    assert (created.node, created.model) == ("g1", "a")
    assert only(acts, Migrate) == Migrate("r", "V", created.instance)
    assert only(acts, Load).instance == created.instance
    assert not [a for a in acts if isinstance(a, Evict)] and victim.draining


def test_without_cold_destinations_no_warm_instance_means_drop():
    sched, victim, target, _, r = scheduler_with_cluster(warm_destination=False)
    acts = sched.handle(RequestArrived("q", "b", 2048, 50, 0.0), 0.0)
    assert only(acts, Evict).requests == ("r",) and not [a for a in acts if isinstance(a, Migrate)]


def test_a_rebuild_takes_another_round_while_the_source_runs_ahead():
    """ServerlessLLM's multi-round migration: r's source made 5 tokens during the rebuild, more than
    the gap of 4 a hand-over may catch up, so D rebuilds those in a second round first."""
    sched, victim, target, dest, r = scheduler_with_cluster(replace(CONFIG, migration_rounds=3))
    rebuild, source = preempt_by_migration(sched, victim, dest)
    t = 0.0
    for _ in range(5):
        t += 0.07
        acts = sched.handle(StepFinished("V", source.grant_id, "decode", ("r",), (), 63, 0.07, True),
                            t)
        source = next(a for a in acts if isinstance(a, Grant) and a.instance == "V")
    acts = sched.handle(StepFinished("D", rebuild.grant_id, "prefill", (), (), 63, 0.4, True), t)
    second = only(acts, Grant)
    assert (second.instance, second.kind) == ("D", "prefill") and r.copy_rounds == 2
    acts = sched.handle(StepFinished("D", second.grant_id, "prefill", (), (), 63, 0.01, True), t)
    assert r.copy_ready and not [a for a in acts if isinstance(a, HandOver)]   # V is decoding
    acts = sched.handle(StepFinished("V", source.grant_id, "decode", ("r",), (), 63, 0.07, True), t)
    assert only(acts, HandOver) == HandOver("r", "V", "D")


def test_the_victims_memory_grows_the_preempting_instance_once_it_is_retired():
    """On a g0 with room for only 30 more of T's blocks beside V, q joins T when V is chosen; but V
    keeps its memory while r streams on, so T's KV grows by those 30 only, short of what q's
    prompt needs, and T is granted nothing until it has grown. V's retirement at the hand-over
    gives its memory back, and T grows into it (found by the simulator: T's requests waited
    forever)."""
    sched, victim, target, dest, r = scheduler_with_cluster(g0_memory=4_880 + 30 * 16)
    grants = preempt_by_migration(sched, victim, dest)
    assert target.kv.target == 80 + 30 < kv_blocks_needed(target)
    hand_over(sched, *grants)
    assert victim.retired and target.kv.target >= kv_blocks_needed(target)
