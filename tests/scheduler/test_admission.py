"""Shadow validation (§4.2.4): each of the three failure cases, and the full-simulation option."""
from dataclasses import replace

from scheduler.admission import ShadowValidator
from scheduler.estimate import Estimator
from scheduler.kv import OutputEstimator
from scheduler.state import Node, Request
from sched_builders import EXACT, node_spec, ready_instance, request_due


def validator(config=EXACT):
    return ShadowValidator(config, Estimator(config), OutputEstimator(220))


def new_request(rid, input_tokens, arrival=0.0):
    slo = EXACT.slo
    return Request(rid, "m", input_tokens, 50, arrival, slo.ttft(input_tokens), slo.tpot_slo)


def test_case1_own_prefill_too_late():
    node = Node(node_spec())
    other = ready_instance(node, "other")
    request_due("o", deadline=1.0, inst=other, prefilled=False, input_tokens=1000)  # 1.0 s first
    target = ready_instance(node, "target")
    assert not validator().admit(target, new_request("r", 1024), now=0.0)  # 2.024 > TTFT 2.0
    assert not validator().admit(target, new_request("r", 900), now=0.0)   # 1.9 > 1.758
    assert validator().admit(target, new_request("r", 2048), now=0.0)      # 3.048 ≤ 4.0


def test_case2_pushes_an_existing_prefill_past_its_deadline():
    node = Node(node_spec())
    other = ready_instance(node, "other")
    # waiting prompt of 1500 tokens (1.5 s) due at 2.43 s: fine alone, late after R's 1.024 s
    request_due("o", deadline=2.43, inst=other, prefilled=False, input_tokens=1500)
    target = ready_instance(node, "target")
    r = new_request("r", 1024)                                    # due at 2.0 s: EDF runs R first
    assert not validator().admit(target, r, now=0.0)


def test_violations_queued_before_the_request_are_pre_existing():
    node = Node(node_spec())
    hopeless = ready_instance(node, "hopeless")
    request_due("h", deadline=0.1, inst=hopeless, prefilled=False, input_tokens=200)  # late anyway
    target = ready_instance(node, "target")
    assert validator().admit(target, new_request("r", 300), now=0.0)   # 0.2 + 0.3 ≤ 0.586


def test_case3_decode_slices_exceed_tpot():
    node = Node(node_spec())
    big = ready_instance(node, "big")
    small = ready_instance(node, "small")
    for k in range(6):
        request_due(f"b{k}", deadline=5.0, inst=big)              # 50 + 6·20 = 170 ms
    request_due("s0", deadline=5.0, inst=small)                   # 70 ms → Σ 0.96 · TPOT
    v = validator()
    assert abs(v.decode_load(node) - 0.96) < 1e-9
    assert not v.admit(big, new_request("r", 64), now=0.0)        # 190 + 70 = 260 ms > 250 ms


def test_running_grant_delays_validation_start():
    node = Node(node_spec())
    target = ready_instance(node, "target")
    node.grant_instance = ready_instance(node, "busy")
    node.grant_end_estimate = 1.5
    assert not validator().admit(target, new_request("r", 1024), now=0.0)   # 1.5 + 1.024 > 2
    node.grant_end_estimate = 0.5
    assert validator().admit(target, new_request("r", 1024), now=0.0)


def test_full_simulation_also_protects_decoding_requests():
    node = Node(node_spec())
    decoding = ready_instance(node, "decoding")
    request_due("d", deadline=0.51, inst=decoding)                # next token due in 0.51 s
    target = ready_instance(node, "target")
    r = new_request("r", 450, arrival=-0.38)   # due at 0.499 s so it goes first; prefill 0.45 s
    assert validator().admit(target, r, now=0.0)                  # the artifact's EDF misses it:
    full = validator(replace(EXACT, shadow="full"))               # d's token lands at 0.52 s
    assert not full.admit(target, r, now=0.0)
    assert full.admit(target, new_request("r", 300), now=0.0)     # due later: d runs first


def test_a_request_with_a_stricter_tpot_takes_a_larger_time_slice():
    """Check (b) divides by the tightest TPOT on the instance: a per-request override halving it
    doubles the share of time one decode iteration needs."""
    inst = ready_instance(Node(node_spec()), "i")
    request_due("a", deadline=5.0, inst=inst)
    est = Estimator(EXACT)
    relaxed = request_due("b", deadline=5.0, tpot=EXACT.slo.tpot_slo)
    strict = request_due("c", deadline=5.0, tpot=EXACT.slo.tpot_slo / 2)
    assert est.time_slice(inst, strict) == 2 * est.time_slice(inst, relaxed)


def test_a_node_whose_steps_overrun_their_estimates_admits_less_until_it_recovers():
    """Decode steps at twice the profiled time (a shared machine in a slow phase) raise the node's
    estimates towards 2×, so a request that fitted is refused; once steps are back on time the
    factor decays to 1, never below."""
    node = Node(node_spec())
    big = ready_instance(node, "big")
    for k in range(3):
        request_due(f"b{k}", deadline=5.0, inst=big)              # 50 + 3·20 = 110 ms: 0.44 TPOT
    v = validator()
    assert v.admit(big, new_request("r", 64), now=0.0)
    for _ in range(20):
        v.est.observe_decode(big, 3, big.context_tokens, 2 * 0.110)
    assert 1.95 < v.est.slowdown("g0") <= 2.0
    assert abs(v.decode_load(node) - 2 * 0.44) < 0.02
    assert not v.admit(big, new_request("r", 64), now=0.0)        # 2 · 130 ms > 250 ms
    for _ in range(40):
        v.est.observe_decode(big, 3, big.context_tokens, 0.5 * 0.110)
    assert 1.0 <= v.est.slowdown("g0") < 1.01
    assert v.admit(big, new_request("r", 64), now=0.0)
    assert v.est.slowdown("another node") == 1.0
