"""The simulator's migration hand-over, action by action: the destination's catch-up prefill is
charged on its node and makes the request's next token, as on the live runtime (`HandedOver`)."""
import heapq

import pytest

from refengine.sim.metrics import RequestRecord
from refengine.sim.simulator import DEFERRED, HANDED, STEP, Simulation
from scheduler import (Assign, CreateInstance, Grant, HandedOver, HandOver, Migrate, RequestCancelled,
                       StepFinished, preset)
from sim_checks import workload

PROMPT = 100


def scene(output_tokens: int = 50) -> tuple[Simulation, list]:
    """`src` on gpu0 decodes r0, warm instances `dst` (gpu1) and `dst2` (gpu0) of its model wait;
    the actions are applied by hand (the scheduler only hears the events)."""
    events: list = []
    sim = Simulation(workload([(0, 0.0, PROMPT, output_tokens)], 1), preset("slinfer", migration=True),
                     size="7b", cpus=0, gpus=2, observer=lambda event, actions: events.append(event))
    for iid, node in (("src", "gpu0"), ("dst", "gpu1"), ("dst2", "gpu0")):
        sim._apply(CreateInstance(iid, node, "m0"))
        sim._instances[iid].weights, sim._instances[iid].kv_blocks = True, 1000
    sim.rec.requests["r0"] = RequestRecord("m0", 0.0, PROMPT, output_tokens)
    sim._apply(Assign("r0", "src", PROMPT, 0))
    sim._instances["src"].step("prefill")
    return sim, events


def decode(sim: Simulation, iid: str, steps: int) -> None:
    for _ in range(steps):
        sim._instances[iid].step("decode")


def rebuild(sim: Simulation, source: str, dest: str) -> None:
    sim._apply(Migrate("r0", source, dest))
    sim._instances[dest].step("prefill")


def hand_over_after_3_more(sim: Simulation) -> None:
    """r0, rebuilt on dst at 4 tokens, is handed over there at 7: dst catches up 4 tokens."""
    decode(sim, "src", 3)
    rebuild(sim, "src", "dst")
    decode(sim, "src", 3)
    sim._apply(HandOver("r0", "src", "dst"))


def run_events(sim: Simulation) -> None:
    """The simulator's loop, over the events the applied actions queued."""
    handlers = {HANDED: sim._on_handed, DEFERRED: sim._on_deferred, STEP: sim._on_step}
    while sim._heap:
        sim.now, kind, _, payload = heapq.heappop(sim._heap)
        handlers[kind](payload)


def kv_held(sim: Simulation, iid: str) -> int:
    inst = sim._instances[iid]
    seqs = [*inst.running.values(), *inst.rebuilt.values(), *inst.handing.values()]
    return sum(inst.model.blocks_for(s.context) for s in seqs)


def test_the_catch_up_is_charged_and_makes_the_next_token():
    sim, events = scene()
    sim.now = t0 = 10.0
    hand_over_after_3_more(sim)
    dst = sim._instances["dst"]
    catch_up = dst.table.prefill(7 - 4 + 1)     # the tokens made meanwhile, and the newest
    assert "r0" in dst.handing and dst.has_work("decode") and kv_held(sim, "dst") == dst.kv_used
    assert sim._instances["src"].kv_used == 0
    sim._apply(Grant(1, "gpu1", "dst", "decode", 1))   # granted during the catch-up: waits for it
    run_events(sim)
    handed, stepped = [e for e in events if isinstance(e, (HandedOver, StepFinished))]
    assert handed == HandedOver("dst", "r0", True, False, dst.kv_used, catch_up)
    assert stepped.sequences == ("r0",) and stepped.grant_done
    assert sim.now == pytest.approx(t0 + catch_up + stepped.elapsed)
    assert dst.running["r0"].generated == 9     # the catch-up's token, then the decode's
    assert sim.rec.handover_pauses == [pytest.approx(catch_up)] and sim.rec.migrations == 1
    assert kv_held(sim, "dst") == dst.kv_used


def test_a_rebuild_that_reached_the_newest_token_decodes_on_at_once():
    sim, events = scene()
    decode(sim, "src", 3)
    rebuild(sim, "src", "dst")
    sim._apply(HandOver("r0", "src", "dst"))
    assert sim._instances["dst"].running["r0"].generated == 4
    run_events(sim)
    assert events == [HandedOver("dst", "r0", False, False, sim._instances["dst"].kv_used, 0.0)]
    assert sim.rec.handover_pauses == [0.0]


def test_the_catch_up_token_can_end_the_request_and_an_empty_grant_runs():
    sim, events = scene(output_tokens=8)
    hand_over_after_3_more(sim)
    sim._apply(Grant(1, "gpu1", "dst", "decode", 1))
    run_events(sim)
    handed, stepped = [e for e in events if isinstance(e, (HandedOver, StepFinished))]
    assert handed.finished and handed.kv_blocks_used == 0
    assert stepped.sequences == () and stepped.elapsed == 0.0 and stepped.grant_done
    assert sim.rec.requests["r0"].finish == pytest.approx(handed.elapsed)
    assert sim._unresolved == 0


def test_a_request_moved_on_during_its_catch_up_leaves_after_it_with_its_token():
    sim, events = scene()
    hand_over_after_3_more(sim)                 # catching up on gpu1 until `first`
    first = sim._instances["dst"].table.prefill(4)
    rebuild(sim, "dst", "dst2")                 # rebuilt on gpu0 from the 7 tokens known
    sim._apply(HandOver("r0", "dst", "dst2"))   # waits for the catch-up on gpu1
    assert "r0" in sim._instances["dst"].handing and sim._arriving["dst2"] == 1
    sim._apply(Grant(1, "gpu0", "dst2", "decode", 1))  # allowed: its request is on the way
    run_events(sim)
    first_handed, second_handed = [e for e in events if isinstance(e, HandedOver)]
    assert (first_handed.instance, first_handed.produced) == ("dst", True)
    second = sim._instances["dst2"].table.prefill(8 - 7 + 1)
    assert (second_handed.instance, second_handed.elapsed) == ("dst2", second)
    assert sim._instances["dst2"].running["r0"].generated == 9
    assert sim._instances["dst"].kv_used == 0 and not sim._arriving["dst2"]
    # the client's pauses: each from the token before it (the first catch-up made one)
    assert sim.rec.handover_pauses == [pytest.approx(first), pytest.approx(second)]


def test_a_later_round_rebuilds_only_the_tokens_made_since_the_last():
    """ServerlessLLM's multi-round migration: before a prefill of the destination, its rebuild
    takes the tokens the source made since, and prefills those on top of the KV it holds."""
    sim, _ = scene()
    decode(sim, "src", 3)
    rebuild(sim, "src", "dst")                  # round 1: the 104 tokens known
    decode(sim, "src", 6)                       # r0 has 10 tokens
    dst = sim._instances["dst"]
    sim._apply(Grant(1, "gpu1", "dst", "prefill", 1))
    step = next(payload for _, kind, _, payload in sim._heap if kind == STEP)[2]
    assert step.elapsed == pytest.approx(dst.table.prefill(6)) and step.sequences == ()
    assert dst.rebuilt["r0"].context == PROMPT + 10 and kv_held(sim, "dst") == dst.kv_used
    run_events(sim)
    decode(sim, "src", 1)
    sim._apply(HandOver("r0", "src", "dst"))
    assert dst.table.prefill(11 - 10 + 1) == pytest.approx(sim.rec.handover_pauses[0])


def test_a_migration_sends_only_the_tokens_the_client_has():
    """The source's state moves when its step begins; a move decided while that step runs copies
    the tokens delivered so far, as the live runtime sends what the client has."""
    sim, _ = scene()
    decode(sim, "src", 3)
    sim._apply(Grant(1, "gpu0", "src", "decode", 1))   # r0's 5th token is being made
    sim._apply(Migrate("r0", "src", "dst"))
    assert sim._instances["src"].running["r0"].generated == 5
    assert sim._instances["dst"].waiting["r0"].generated == 4


def test_a_client_leaving_during_the_catch_up_gets_no_token_from_it():
    sim, events = scene()
    hand_over_after_3_more(sim)
    sim._on_cancel("r0")                        # the client left at its 7th token
    run_events(sim)
    cancelled, handed = events
    assert cancelled == RequestCancelled("r0")
    assert handed == HandedOver("dst", "r0", False, False, 0, sim._instances["dst"].table.prefill(4))
    assert not sim._instances["dst"].handing and sim._instances["dst"].kv_used == 0
    assert sim.rec.requests["r0"].cancelled and sim._unresolved == 0


def test_a_client_leaving_before_a_deferred_hand_over_leaves_no_rebuild_behind():
    sim, events = scene()
    hand_over_after_3_more(sim)
    rebuild(sim, "dst", "dst2")
    sim._apply(HandOver("r0", "dst", "dst2"))   # deferred behind dst's catch-up
    sim._on_cancel("r0")
    run_events(sim)
    assert all(not i.handing and not i.rebuilt and i.kv_used == 0 for i in sim._instances.values())
    assert not sim._arriving["dst2"]
