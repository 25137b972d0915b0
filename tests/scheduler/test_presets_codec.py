"""Baselines are presets of one configuration (§6.2, §6.4); events/actions round-trip as JSON."""
import json

import pytest

from scheduler import (Assign, Evict, Grant, HandedOver, KvResize, PRESETS, RequestArrived,
                       StepFinished, preset)
from scheduler.codec import decode, encode
from scheduler.partition import fixed_kv_blocks, instance_cap, time_share
from sched_builders import model, node_spec


def test_presets_differ_only_in_configuration():
    assert set(PRESETS) >= {"slinfer", "sllm", "sllm+c", "sllm+c+s", "slinfer-no-cpu",
                            "slinfer-no-sharing", "slinfer-no-consolidation"}
    m, gpu = model(weight=1000), node_spec(memory=10_000)
    sllm, cs = preset("sllm"), preset("sllm+c+s")
    assert sllm.pools == ("gpu",) and preset("sllm+c").pools == ("cpu", "gpu")
    assert instance_cap(m, gpu, sllm) == 1 and instance_cap(m, gpu, cs) == 2
    assert fixed_kv_blocks(m, gpu, sllm) == (10_000 - 1000) // 16          # whole GPU as KV
    assert fixed_kv_blocks(m, gpu, cs) == (5_000 - 1000) // 16             # half of it
    assert fixed_kv_blocks(m, gpu, preset("slinfer")) is None               # elastic
    assert time_share(m, gpu, cs) == 0.5 and time_share(m, gpu, sllm) == 1.0
    assert cs.concurrency_limit("llama-2-7b", "cpu") == 4
    assert preset("slinfer", watermark=0.0).watermark == 0.0
    with pytest.raises(KeyError, match="unknown scheduler preset"):
        preset("vllm")


@pytest.mark.parametrize("item", [
    RequestArrived("r", "m", 10, 20, 1.5),
    RequestArrived("r", "m", 10, 20, 1.5, ttft_slo=2.0, tpot_slo=None),
    StepFinished("i", 3, "decode", ("a", "b"), ("b",), 12, 0.05, True),
    HandedOver("i", "r", True, False, 12, 0.02),
    Grant(1, "g0", "i", "decode", 2), Assign("r", "i", 10, 3), KvResize(7, "i", 40, 10),
    Evict(8, "i", ("a",)),
])
def test_json_round_trip(item):
    assert decode(json.loads(json.dumps(encode(item)))) == item


def test_decode_rejects_unknown_types():
    with pytest.raises(ValueError, match="unknown"):
        decode({"type": "Nope"})
