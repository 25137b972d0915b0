"""The live runtime over the model store: bandwidths measured at start-up, tiers reported to the
scheduler, CPU instances of one checkpoint sharing its host-cache entry."""
from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from types import SimpleNamespace

from models.catalogue import Catalogue, ModelSpec
from refengine.runtime.model_tiers import HOST, TierReports, describe
from scheduler.events import ModelTierChanged
from scheduler.specs import LoadBandwidths
from tests.runtime.test_live import collect, runtime, text_of

NAMES = ("smollm2-135m-instruct", "smollm2-135m-instruct-r1")
WEIGHTS = "smollm2-135m-instruct"


def test_start_up_fills_the_host_tier_and_instances_share_its_entry(model_home):
    async def scenario():
        rt = runtime(model_home, replicas=1, keep_alive=0.5)
        await rt.start()
        try:
            node = rt.scheduler.nodes["cpu:0"].spec
            tiers = {name: rt.scheduler.startup.tier(HOST, name) for name in NAMES}
            results = await asyncio.gather(*(collect(rt, name) for name in NAMES))
            both_loaded = rt.store.host.pins(WEIGHTS), rt.store.residency(WEIGHTS)
            await asyncio.sleep(1.5)                                   # past the keep-alive
            return node, tiers, results, both_loaded, rt.store.host.pins(WEIGHTS), rt.store.residency(WEIGHTS)
        finally:
            await rt.stop()

    node, tiers, results, (pins, residency), pins_after, residency_after = asyncio.run(scenario())
    assert node.host == HOST
    assert 0 < node.bandwidths.disk_to_host < math.inf          # measured, not assumed
    assert node.bandwidths.host_to_device > node.bandwidths.disk_to_host
    assert tiers == dict.fromkeys(NAMES, "host")
    assert text_of(results[0]) == text_of(results[1])
    assert pins == 2 and residency.tier == "device" and residency.devices == ("cpu:0",)
    assert pins_after == 0 and residency_after.tier == "host"  # unloaded; the entry stays cached


def test_without_a_host_tier_models_load_from_disk(model_home):
    async def scenario():
        rt = runtime(model_home)
        rt.options = replace(rt.options, host_cache_bytes=0)
        await rt.start()
        try:
            events = await collect(rt, NAMES[0])
            return rt.scheduler.nodes["cpu:0"].spec.bandwidths, rt.scheduler.startup.tier(HOST, NAMES[0]), events
        finally:
            await rt.stop()

    bandwidths, tier, events = asyncio.run(scenario())
    assert tier == "disk"
    assert bandwidths.host_to_device == math.inf                # a CPU uses the bytes where they were read
    assert 0 < bandwidths.disk_to_host < math.inf
    assert events[-1].completion_tokens == 8


def test_tier_reports_name_every_model_on_weights_that_moved():
    held: set[str] = set()
    store = SimpleNamespace(host=SimpleNamespace(holds=lambda weights: weights in held))
    catalogue = Catalogue([ModelSpec("a", "w1"), ModelSpec("a-copy", "w1"), ModelSpec("b", "w2")])
    reports = TierReports(store, catalogue)
    assert reports.changes() == []                              # everything starts on disk
    held.add("w1")
    assert reports.changes() == [ModelTierChanged(HOST, "a", "host"), ModelTierChanged(HOST, "a-copy", "host")]
    assert reports.changes() == []
    held.symmetric_difference_update({"w1", "w2"})              # w2 came in and evicted w1
    assert reports.changes() == [ModelTierChanged(HOST, "a", "disk"), ModelTierChanged(HOST, "a-copy", "disk"),
                                 ModelTierChanged(HOST, "b", "host")]


def test_describe_names_in_place_loads():
    assert describe(LoadBandwidths(2.1e9, math.inf)) == "disk -> host 2.1 GB/s, host -> device in place"
