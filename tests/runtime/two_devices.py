"""Two logical CPU devices whose placement is deterministic: a pinned cost model, and recorders of
what the scheduler decided and what an instance kept after letting requests go."""
from __future__ import annotations

import json
from pathlib import Path

from refengine.runtime.instances import LiveInstance
from refengine.runtime.live import LiveRuntime
from scheduler.costmodel import FORMAT, profile_filename
from scheduler.slo import SloPolicy

# A decode iteration costs 0.1 s per sequence whatever the context, a prefill 20 ms. With the CPU
# margin (×1.1) and a 0.4 s TPOT, one instance's decode time-slice is 0.275 per sequence, so a
# device's instances hold three sequences between them, not four. The scheduler's choices then
# follow from batch sizes alone, not from how fast a shared machine runs the kernels today; the
# steps themselves run for real.
PINNED_TABLE = {"format": FORMAT, "hardware": "cpu-reference", "unit": "s",
                "source": "tests: pinned so that placement is deterministic",
                "prefill": {"tokens": [1, 100_000], "latency": [0.02, 0.02]},
                "decode": [{"context": 100_000, "batch": [1, 64], "latency": [0.1, 6.4]}]}
PINNED_SLO = SloPolicy(ttft_floor=60.0, ttft_cap=60.0, tpot=0.4)


def pinned_home(model_home: Path, directory: Path, weights: str = "smollm2-135m-instruct") -> Path:
    """A model home sharing `model_home`'s prepared weights, whose profile for `weights` is pinned."""
    home = directory / "home"
    (home / "profiles").mkdir(parents=True)
    (home / "models").symlink_to(model_home / "models")
    table = home / "profiles" / profile_filename(weights, PINNED_TABLE["hardware"])
    table.write_text(json.dumps({**PINNED_TABLE, "profile": weights}))
    return home


def record_actions(rt: LiveRuntime) -> list:
    """Every action the scheduler hands the runtime from now on, in order."""
    actions, handle = [], rt.scheduler.handle

    def recording(event, now):
        decided = handle(event, now)
        actions.extend(decided)
        return decided

    rt.scheduler.handle = recording
    return actions


def kv_after_evictions(monkeypatch) -> list[int]:
    """The KV blocks each instance still uses right after an eviction or hand-over job."""
    freed, evict = [], LiveInstance.evict

    def evicting(self, request_ids):
        states = evict(self, request_ids)
        freed.append(self.kv_blocks_used)
        return states

    monkeypatch.setattr(LiveInstance, "evict", evicting)
    return freed
