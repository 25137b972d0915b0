"""Token-level scheduling (§4.2.3), with the paper's Fig. 14 walk."""
from dataclasses import replace

import pytest

from scheduler import Grant, StepFinished
from scheduler.estimate import Estimator
from scheduler.tokensched import TokenScheduler
from sched_builders import make_scheduler, ready_instance, request_due


def fig14():
    sched = make_scheduler()
    node = sched.nodes["g0"]
    insts = {}
    for name, headrooms, prefilled in (("inst1", (2, 3, 5), True), ("inst2", (1.9,), False),
                                       ("inst3", (2.5, 3), True)):
        inst = ready_instance(node, name)
        sched.life.instances[name] = inst
        for k, h in enumerate(headrooms):
            sched.life.requests[f"{name}-{k}"] = request_due(f"{name}-{k}", h, inst, prefilled)
        insts[name] = inst
    return sched, node, insts


def headrooms(inst, now):
    return sorted(round(r.deadline - now, 6) for r in inst.requests.values())


def test_fig14_headroom_walk():
    sched, node, insts = fig14()
    first = sched.tokens.grant(node, now=0.0)
    assert (first.instance, first.kind, first.iterations) == ("inst2", "prefill", 1)
    assert sched.tokens.grant(node, now=0.0) is None          # one permit per node
    # Inst-2's prefill takes 0.2 s and yields its first token
    actions = sched.handle(StepFinished("inst2", first.grant_id, "prefill", ("inst2-0",), (),
                                        kv_blocks_used=7, elapsed=0.2, grant_done=True), now=0.2)
    assert headrooms(insts["inst2"], 0.2) == [1.95]           # 1.9 − 0.2 + 0.25
    assert headrooms(insts["inst1"], 0.2) == [1.8, 2.8, 4.8]
    assert headrooms(insts["inst3"], 0.2) == [2.3, 2.8]
    grants = [a for a in actions if isinstance(a, Grant)]
    assert [(g.instance, g.kind) for g in grants] == [("inst1", "decode")]


def test_eligibility_rules():
    sched, node, insts = fig14()
    insts["inst2"].in_flight = object()                        # memory action in flight
    insts["inst1"].weights.target = 0                          # being unloaded
    assert sched.tokens.pick(node, 0.0) is insts["inst3"]
    insts["inst3"].kv.physical = 0                             # no KV yet
    assert sched.tokens.pick(node, 0.0) is None


def test_time_share_pauses_an_instance_until_its_share_returns():
    sched, node, insts = fig14()
    for name in ("inst1", "inst2"):
        del node.instances[name]
    inst = insts["inst3"]
    inst.time_share, inst.busy_time = 0.5, 3.0                 # computed 3 s of its first 4 s
    assert not TokenScheduler.eligible(inst, now=4.0)
    assert TokenScheduler.share_wakeup(node, now=4.0) == pytest.approx(6.0)
    assert TokenScheduler.eligible(inst, now=6.0)


def test_gpu_decode_grants_hold_several_fast_iterations():
    sched, node, insts = fig14()
    est = sched.estimator
    inst = insts["inst3"]
    step = est.decode(inst, inst.batch, inst.context_tokens)   # 50 + 2 · 20 = 90 ms
    assert est.decode_iterations(inst, step) == 1              # longer than the 50 ms target
    assert Estimator(replace(sched.config, grant_target=0.3)).decode_iterations(inst, step) == 3
