"""The live runtime on the real SmolLM2 weights, driven by the real SLINFER scheduler.

Reference backend and a quick latency grid keep it to seconds; what is checked is the executor:
interleaved models, keep-alive scale-to-zero, cancellation freeing KV blocks, per-request SLOs,
device failures, logical devices with bin-packing and preemption.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import pytest

from models.catalogue import Catalogue
from refengine.engine.sequence import SamplingParams
from refengine.generate import PromptSpec, generate
from refengine.runtime.api import DeviceFailure, Finished, Overloaded, SloOverride, TokenChunk
from refengine.runtime.devices import DeviceSpec
from refengine.runtime.instances import LiveInstance
from refengine.runtime.live import LiveRuntime, RuntimeOptions
from refengine.runtime.profile import QUICK_GRID
from scheduler import actions as act
from scheduler.events import HandedOver
from scheduler.slo import SloPolicy
from refengine.bench.migrate_bench import PINNED_SLO, pinned_home
from tests.runtime.two_devices import kv_after_evictions, record_actions

PROMPT = "The capital of France is"
# The reference backend on a shared 2-core machine is slow and noisy; these tests check the executor,
# not SLO attainment, so they give every request a generous SLO instead of SLINFER's 0.5 s / 0.25 s.
RELAXED = SloPolicy(ttft_floor=60.0, ttft_cap=60.0, tpot=5.0)


def runtime(model_home, devices=("cpu:0",), replicas=1, keep_alive=1.0, memory=4 << 30,
            backend="reference") -> LiveRuntime:
    return LiveRuntime(RuntimeOptions(Catalogue.default(replicas=replicas),
                                      [DeviceSpec(d, memory) for d in devices], keep_alive_s=keep_alive,
                                      backend=backend, home=model_home, profile_grid=QUICK_GRID,
                                      slo=RELAXED))


async def collect(rt, model, prompt=PROMPT, max_tokens=8, slo=None):
    ids = rt.tokenizer(model).encode(prompt)
    return [e async for e in rt.generate(model, ids, SamplingParams(max_tokens=max_tokens), slo)]


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenChunk))


def test_two_models_at_once_match_offline_greedy_then_scale_to_zero(model_home, smollm2):
    expected = generate(smollm2, [PromptSpec(PROMPT)], SamplingParams(max_tokens=8))[0].text

    async def scenario():
        rt = runtime(model_home, replicas=1, keep_alive=0.5)
        await rt.start()
        try:
            results = await asyncio.gather(collect(rt, "smollm2-135m-instruct"), collect(rt, "smollm2-135m-instruct-r1"))
            await asyncio.sleep(2.0)                              # past the keep-alive
            return results, rt.status()
        finally:
            await rt.stop()

    results, status = asyncio.run(scenario())
    for events in results:
        assert text_of(events) == expected
        assert isinstance(events[-1], Finished) and events[-1].reason == "length" and events[-1].cold_start
        assert events[-1].cold_start_grace_s > 0                # the measured load and first KV sizing
    assert status.instances == [] and all(v == 0 for v in status.device_memory_actual.values())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_model_s_instances_on_a_device_learn_thread_counts_into_one_tuner(model_home, monkeypatch, backend):
    """On the Numba CPU backend: scaled to zero and started again, a model's new instance starts from
    what the device's earlier instances of its weights learnt of thread counts, instead of trying
    every count again; so does another model on the same weights (the same steps take the same time).
    Other backends get none (nor import Numba for it)."""
    import refengine.runtime.instances as instances
    from kernels.thread_tuner import ThreadCountTuner
    tuners: list = []
    real = instances.with_fast_decode

    def spy(model, tuner=None):
        tuners.append(tuner)
        return real(model, tuner=tuner)

    monkeypatch.setattr(instances, "with_fast_decode", spy)

    async def scenario():
        rt = runtime(model_home, replicas=1, keep_alive=0.3, backend=backend)
        await rt.start()
        try:
            await collect(rt, "smollm2-135m-instruct", max_tokens=2)
            await asyncio.sleep(1.0)                              # past the keep-alive: scaled to zero
            await collect(rt, "smollm2-135m-instruct", max_tokens=2)
            await collect(rt, "smollm2-135m-instruct-r1", max_tokens=2)
            return rt.counters["cold_starts"]
        finally:
            await rt.stop()

    assert asyncio.run(scenario()) == 3
    first, again, replica = tuners
    if backend == "cpu":
        assert isinstance(first, ThreadCountTuner) and again is first and replica is first
    else:
        assert tuners == [None, None, None]


def test_cancelled_stream_frees_its_blocks_and_the_runtime_keeps_serving(model_home):
    async def scenario():
        rt = runtime(model_home, keep_alive=5.0)
        await rt.start()
        try:
            stream = rt.generate("smollm2-135m-instruct", rt.tokenizer("smollm2-135m-instruct").encode(PROMPT),
                                 SamplingParams(max_tokens=200))
            async for _ in stream:                                # one token, then the client leaves
                break
            await stream.aclose()
            for _ in range(50):                                   # the abort runs at the device's next job
                blocks_after_cancel = [i.kv_blocks_used for i in rt.status().instances]
                if blocks_after_cancel == [0]:
                    break
                await asyncio.sleep(0.1)
            after = await collect(rt, "smollm2-135m-instruct", max_tokens=3)
            return blocks_after_cancel, after
        finally:
            await rt.stop()

    blocks, after = asyncio.run(scenario())
    assert blocks == [0]
    assert isinstance(after[-1], Finished) and after[-1].completion_tokens == 3
    assert not after[-1].cold_start and after[-1].cold_start_grace_s == 0.0     # kept alive: warm


def test_unknown_model_and_bad_params_fail_before_any_work(model_home):
    async def scenario():
        rt = runtime(model_home)
        await rt.start()
        try:
            from models.catalogue import UnknownModelError
            from refengine.engine.sequence import ContextLengthError, RequestError
            with pytest.raises(UnknownModelError, match="known models"):
                await collect(rt, "nope")
            with pytest.raises(RequestError, match="max_tokens"):
                await collect(rt, "smollm2-135m-instruct", max_tokens=0)
            assert rt.context_length("smollm2-135m-instruct") == 8192      # SmolLM2's config.json
            with pytest.raises(ContextLengthError):
                await collect(rt, "smollm2-135m-instruct", max_tokens=8190)
            with pytest.raises(UnknownModelError):
                rt.context_length("nope")
            return rt.status()
        finally:
            await rt.stop()

    assert asyncio.run(scenario()).instances == []


def test_a_model_no_device_can_hold_stops_the_start_before_any_profiling(model_home, monkeypatch):
    """Such a model's requests could only be refused as overloaded, one by one; say so at start-up."""
    from refengine.runtime import setup
    monkeypatch.setattr(setup, "measure_disk_to_host", lambda *a: pytest.fail("measured the tiers"))
    rt = LiveRuntime(RuntimeOptions(Catalogue.default(), [DeviceSpec("cpu:0", 100 << 20), DeviceSpec("cpu:1", 200 << 20)],
                                    backend="reference", home=model_home))
    with pytest.raises(setup.ModelTooLarge, match=r"smollm2-135m-instruct needs 873 MiB \(weights, and KV for one "
                                                   r"request of its 8192-token context\), more than any device may use \(cpu:0 100 MiB, cpu:1 200 MiB\)"):
        rt.prepare()


def test_a_request_s_own_slo_reaches_the_scheduler(model_home):
    """RELAXED gives every request a minute; a request asking for its first token within 0.1 ms is
    one no placement can promise, so the scheduler drops it before creating anything."""
    async def scenario():
        rt = runtime(model_home)
        await rt.start()
        try:
            with pytest.raises(Overloaded, match="SLO"):
                await collect(rt, "smollm2-135m-instruct", slo=SloOverride(ttft_s=1e-4, tpot_s=2.0))
            return rt.status()
        finally:
            await rt.stop()

    status = asyncio.run(scenario())
    assert status.instances == [] and status.drops == 1


def fail_once(monkeypatch, method: str, when=lambda inst: True) -> None:
    """LiveInstance.<method> raises the first time `when(instance)` holds, then behaves."""
    original, failed = getattr(LiveInstance, method), []

    def flaky(self, *args):
        if not failed and when(self):
            failed.append(self.name)
            raise RuntimeError(f"injected {method} failure")
        return original(self, *args)

    monkeypatch.setattr(LiveInstance, method, flaky)


@pytest.mark.parametrize("stage", ["begin_load", "finish_load"])
def test_a_failed_load_ends_its_request_and_the_next_one_cold_starts(model_home, monkeypatch, stage):
    fail_once(monkeypatch, stage)

    async def scenario():
        rt = runtime(model_home, keep_alive=5.0)
        await rt.start()
        try:
            with pytest.raises(DeviceFailure, match=f"injected {stage} failure"):
                await collect(rt, "smollm2-135m-instruct", max_tokens=2)
            return await collect(rt, "smollm2-135m-instruct", max_tokens=2), rt.status()
        finally:
            await rt.stop()

    after, status = asyncio.run(scenario())
    assert isinstance(after[-1], Finished) and after[-1].completion_tokens == 2 and after[-1].cold_start
    assert status.failures == 1 and [i.loaded for i in status.instances] == [True]


def test_a_failed_step_ends_only_its_instance_s_requests(model_home, smollm2, monkeypatch):
    """Two models share the device; a decode step of one raises mid-stream. Its request ends with a
    DeviceFailure after the tokens it had, its memory is freed, the other model finishes untouched."""
    expected = generate(smollm2, [PromptSpec(PROMPT)], SamplingParams(max_tokens=6))[0].text
    calls: dict[str, int] = {}

    def third_step_of_r1(inst) -> bool:
        calls[inst.name] = calls.get(inst.name, 0) + 1
        return inst.model.endswith("-r1") and calls[inst.name] == 3

    fail_once(monkeypatch, "step", third_step_of_r1)

    async def failing(rt, model="smollm2-135m-instruct-r1"):
        events = []
        with pytest.raises(DeviceFailure, match="injected step failure"):
            async for event in rt.generate(model, rt.tokenizer(model).encode(PROMPT), SamplingParams(max_tokens=6)):
                events.append(event)
        return events

    async def scenario():
        rt = runtime(model_home, replicas=1, keep_alive=5.0)
        await rt.start()
        try:
            survivor, failed = await asyncio.gather(collect(rt, "smollm2-135m-instruct", max_tokens=6),
                                                    failing(rt))
            return survivor, failed, rt.status()
        finally:
            await rt.stop()

    survivor, failed, status = asyncio.run(scenario())
    assert text_of(survivor) == expected
    assert 1 <= len(failed) < 6 and all(isinstance(e, TokenChunk) for e in failed)
    assert [i.model for i in status.instances] == ["smollm2-135m-instruct"]
    assert status.device_memory_actual["cpu:0"] == status.instances[0].memory_bytes


BURST, NEIGHBOUR = "smollm2-135m-instruct", "smollm2-135m-instruct-r1"
BURST_PROMPTS = [PROMPT, "Once upon a time", "The sky is"]
LONG = SamplingParams(max_tokens=24, ignore_eos=True)     # still decoding when the move completes


async def read_all(stream) -> list:
    return [e async for e in stream]


async def settled(rt: LiveRuntime, timeout: float = 30.0):
    """The status once no instance holds a sequence (the devices' queued jobs have run)."""
    for _ in range(int(timeout / 0.05)):
        status = rt.status()
        if all(i.running == i.waiting == 0 for i in status.instances):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"instances still hold sequences: {rt.status().instances}")


def preempted_neighbour(model_home, tmp_path, migration: bool, client=read_all):
    """The two-device scene: the neighbour streams on cpu:0 until a burst of three on another model
    overloads it, its client reading the rest of its stream with `client`. Returns the neighbour's
    events, the burst's, the scheduler's actions, the status once settled, and the events the
    scheduler was handed."""
    handled = []

    async def scenario():
        rt = LiveRuntime(RuntimeOptions(
            Catalogue.default(replicas=1), [DeviceSpec("cpu:0", 4 << 30), DeviceSpec("cpu:1", 4 << 30)],
            keep_alive_s=5.0, backend="reference", home=pinned_home(model_home, tmp_path, "cpu-reference"),
            slo=PINNED_SLO, migration=migration))
        await rt.start()
        actions = record_actions(rt, handled)
        try:
            stream = rt.generate(NEIGHBOUR, rt.tokenizer(NEIGHBOUR).encode(PROMPT), LONG)
            events = [await anext(stream), await anext(stream)]        # decoding on cpu:0
            bursting = asyncio.gather(*(collect(rt, BURST, p, max_tokens=4) for p in BURST_PROMPTS))
            events += await client(stream)
            bursts = await bursting
            return events, bursts, actions, await settled(rt), handled
        finally:
            await rt.stop()

    return asyncio.run(scenario())


@pytest.mark.parametrize("migration", [False, True], ids=["re-prefill", "live-migration"])
def test_two_cpu_devices_bin_pack_a_burst_and_preempt_the_smaller_neighbour(model_home, smollm2, tmp_path,
                                                                            monkeypatch, migration):
    """The neighbour decodes on cpu:0; a burst of three on another model arrives. The burst's first
    request starts an instance on the busy cpu:0 (most loaded node first), the second joins it
    (largest instance first), the third would overload cpu:0's decode time, so the neighbour with the
    smaller batch is preempted (§4.4.1) and its request moves to a new instance on cpu:1. Without
    migration it is evicted and re-prefilled there with the tokens it had; with live migration
    (ServerlessLLM) cpu:1 rebuilds its KV from its tokens while cpu:0 keeps streaming, then takes
    over. Either way it finishes exactly as greedy decoding would, and the old instance's blocks are
    freed the moment it lets go.

    On a CPU node SLINFER preempts for decode time, not memory (`consolidation.find_victim`: the
    target must fit in memory; memory gaps are the GPU rule), so compute is what runs short here."""
    burst, neighbour = BURST, NEIGHBOUR
    expected_burst = [c.text for c in generate(smollm2, [PromptSpec(p) for p in BURST_PROMPTS],
                                                   SamplingParams(max_tokens=4))]
    expected_neighbour = generate(smollm2, [PromptSpec(PROMPT)], LONG)[0].text
    freed = kv_after_evictions(monkeypatch)
    events, bursts, actions, status, handled = preempted_neighbour(model_home, tmp_path, migration)
    created = [a for a in actions if isinstance(a, act.CreateInstance)]
    assert [(a.model, a.node) for a in created] == [(neighbour, "cpu:0"), (burst, "cpu:0"), (neighbour, "cpu:1")]
    old, packed, new = (a.instance for a in created)
    assigns = [a for a in actions if isinstance(a, act.Assign)]
    moved = assigns[0].request_id
    assert [a.instance for a in assigns if a.request_id != moved] == [packed] * 3
    assert act.Unload in {type(a) for a in actions if getattr(a, "instance", None) == old}
    if migration:
        assert [a for a in actions if isinstance(a, (act.Migrate, act.HandOver))] == [
            act.Migrate(moved, old, new), act.HandOver(moved, old, new)]
        assert not any(isinstance(a, act.Evict) for a in actions)
        assert [a.instance for a in assigns if a.request_id == moved] == [old]     # never re-prefilled
        assert status.migrations == 1
        (caught_up,) = [e for e in handled if isinstance(e, HandedOver)]       # its token, if it made one
        assert (caught_up.instance, caught_up.request_id, caught_up.finished) == (new, moved, False)
        assert caught_up.kv_blocks_used > 0
    else:
        (evict,) = [a for a in actions if isinstance(a, act.Evict)]
        assert evict.instance == old and evict.requests == (moved,)
        (resumed,) = [a for a in assigns if a.request_id == moved and a.instance == new]
        assert resumed.resume_tokens >= 2                               # re-prefilled with what it had
        assert status.migrations == 0 and status.preemptions >= 1
    assert freed == [0]                                                 # the old instance let go of all
    assert text_of(events) == expected_neighbour
    assert isinstance(events[-1], Finished) and events[-1].completion_tokens == 24
    assert [text_of(b) for b in bursts] == expected_burst


def test_a_destination_failing_during_the_rebuild_leaves_the_stream_at_its_source(model_home, smollm2, tmp_path,
                                                                                  monkeypatch):
    """cpu:1's instance fails as it starts rebuilding: the request goes on decoding at its source,
    uninterrupted and exact; the source, draining, unloads once it has finished."""
    fail_once(monkeypatch, "prefetch")
    expected = generate(smollm2, [PromptSpec(PROMPT)], LONG)[0].text
    events, _, actions, status, _ = preempted_neighbour(model_home, tmp_path, migration=True)
    (migrate,) = [a for a in actions if isinstance(a, act.Migrate)]
    assert not any(isinstance(a, (act.HandOver, act.Evict)) for a in actions)
    assert text_of(events) == expected and events[-1].completion_tokens == 24
    assert status.failures == 1 and status.migrations == 0
    assert act.Unload in {type(a) for a in actions if getattr(a, "instance", None) == migrate.source}


def test_a_load_in_flight_does_not_hold_the_device(model_home, monkeypatch):
    """While one model's weights are still arriving (from disk: no host cache), a warm neighbour on
    the same device streams on."""
    gate = threading.Event()
    begin = LiveInstance.begin_load

    def slow_begin(self, *args):
        load = begin(self, *args)
        if self.model.endswith("-r1"):
            real_wait = load.wait
            monkeypatch.setattr(load, "wait", lambda: (gate.wait(30), real_wait())[1])
        return load

    monkeypatch.setattr(LiveInstance, "begin_load", slow_begin)

    async def scenario():
        rt = runtime(model_home, replicas=1, keep_alive=30.0)
        rt.options = replace(rt.options, host_cache_bytes=0)
        await rt.start()
        try:
            await collect(rt, "smollm2-135m-instruct", max_tokens=2)            # warm
            cold = asyncio.create_task(collect(rt, "smollm2-135m-instruct-r1", max_tokens=2))
            await asyncio.sleep(0.2)                                           # its load has begun
            warm = await asyncio.wait_for(collect(rt, "smollm2-135m-instruct", max_tokens=6), 10)
            waiting = not cold.done()
            gate.set()
            return warm, waiting, await cold
        finally:
            gate.set()
            await rt.stop()

    warm, waiting, cold = asyncio.run(scenario())
    assert waiting and warm[-1].completion_tokens == 6 and not warm[-1].cold_start
    assert cold[-1].completion_tokens == 2 and cold[-1].cold_start


def test_an_idle_model_gives_way_to_one_that_needs_its_memory(model_home):
    """The device holds one instance (weights and a full-context KV floor: 1.4 GB); the first
    model, idle but kept alive far beyond the second's first-token deadline, is reclaimed for it.
    Before, the second request waited out the keep-alive and was refused as overloaded."""
    async def scenario():
        rt = runtime(model_home, replicas=1, keep_alive=600.0, memory=1500 << 20)
        await rt.start()
        try:
            first = await collect(rt, "smollm2-135m-instruct", max_tokens=2)
            second = await asyncio.wait_for(collect(rt, "smollm2-135m-instruct-r1", max_tokens=2), 30)
            return first, second, rt.status()
        finally:
            await rt.stop()

    first, second, status = asyncio.run(scenario())
    assert isinstance(first[-1], Finished) and isinstance(second[-1], Finished)
    assert second[-1].completion_tokens == 2 and second[-1].cold_start
    assert [i.model for i in status.instances] == ["smollm2-135m-instruct-r1"]


@pytest.mark.parametrize("stage, method", [("rebuilding", "prefetch"), ("handing over", "evict")])
def test_a_client_leaving_during_a_migration_ends_it_on_both_devices(model_home, tmp_path, monkeypatch,
                                                                     stage, method):
    """The client goes away while its request moves: as the destination starts rebuilding it, or
    after the hand-over began (the request already counts as the destination's) but before the
    source let the sequence go (in this scene the only `evict` is that export). Nothing is handed
    over to a request nobody reads; both devices end up holding nothing, and the burst is served."""
    reached, cancelled, original = threading.Event(), threading.Event(), getattr(LiveInstance, method)

    def after_the_client_left(self, *args):
        if not reached.is_set():
            reached.set()
            assert cancelled.wait(60)
        return original(self, *args)

    monkeypatch.setattr(LiveInstance, method, after_the_client_left)

    async def leave(stream):
        assert await asyncio.to_thread(reached.wait, 120)
        await stream.aclose()
        cancelled.set()
        return []

    _, bursts, actions, status, handled = preempted_neighbour(model_home, tmp_path, migration=True,
                                                             client=leave)
    assert act.Migrate in {type(a) for a in actions}
    assert status.migrations == 0 and not [e for e in handled if isinstance(e, HandedOver)]
    assert all(i.kv_blocks_used == 0 for i in status.instances)
    assert all(isinstance(b[-1], Finished) for b in bursts)


def test_a_destination_failing_at_the_take_over_ends_the_request_with_a_clear_error(model_home, smollm2,
                                                                                    tmp_path, monkeypatch):
    """The source has let the sequence go; the destination's take-over raises. The request ends with
    a DeviceFailure after the tokens it had streamed (a prefix of greedy's, none repeated), the
    failed instance's memory is freed, and the burst is served."""
    fail_once(monkeypatch, "take_over")
    expected = generate(smollm2, [PromptSpec(PROMPT)], LONG)[0].text

    async def until_the_error(stream):
        events = []
        with pytest.raises(DeviceFailure, match="injected take_over failure"):
            async for event in stream:
                events.append(event)
        return events

    events, bursts, actions, status, _ = preempted_neighbour(model_home, tmp_path, migration=True,
                                                            client=until_the_error)
    (handover,) = [a for a in actions if isinstance(a, act.HandOver)]
    assert expected.startswith(text_of(events)) and len(events) >= 2
    assert status.failures == 1 and status.migrations == 0
    assert handover.destination not in {i.instance for i in status.instances}
    assert all(i.kv_blocks_used == 0 for i in status.instances)
    assert all(isinstance(b[-1], Finished) for b in bursts)
