"""For the two-logical-device scenes (their pinned cost model is `bench migrate`'s, in
`refengine/bench/migrate_bench.py`): recorders of what the scheduler decided and of what an instance
kept after letting requests go."""
from __future__ import annotations

from refengine.runtime.instances import LiveInstance
from refengine.runtime.live import LiveRuntime


def record_actions(rt: LiveRuntime, events: list | None = None) -> list:
    """Every action the scheduler hands the runtime from now on, in order (and into `events`, if
    given, every event it is handed)."""
    actions, handle = [], rt.scheduler.handle

    def recording(event, now):
        if events is not None:
            events.append(event)
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
