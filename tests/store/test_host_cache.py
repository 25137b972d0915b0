"""The host cache's rules: the budget is never exceeded, pinned entries are never evicted, and
otherwise the least recently used entry goes first; checked by hand and by a hypothesis state machine."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from refengine.store.host_cache import HostCache

MB = 1 << 20


def filled(cache: HostCache, key: str, nbytes: int) -> np.ndarray | None:
    """Admit, fill, complete and release: a model that was loaded once and is no longer in use."""
    buffer = cache.admit(key, nbytes)
    if buffer is not None:
        buffer[:] = len(key)
        cache.complete(key)
        cache.release(key)
    return buffer


def test_lru_entry_goes_first() -> None:
    cache = HostCache(3 * MB)
    for key in "abc":
        filled(cache, key, MB)
    assert cache.acquire("a") is not None    # a is now the most recently used
    cache.release("a")
    filled(cache, "d", MB)
    assert cache.keys() == ["c", "a", "d"]   # b, least recently used, made room
    assert cache.used_bytes == 3 * MB


def test_pinned_entries_stay() -> None:
    cache = HostCache(2 * MB)
    filled(cache, "a", MB)
    filled(cache, "b", MB)
    assert cache.acquire("a") is not None    # a model on a device
    filled(cache, "c", MB)
    assert cache.keys() == ["a", "c"]        # b went although a was older
    assert cache.admit("d", 2 * MB) is None  # would need a's bytes: refused
    assert cache.keys() == ["a", "c"]        # and nothing was evicted for nothing


def test_incomplete_entry_is_not_found_and_a_failed_fill_leaves_no_trace() -> None:
    cache = HostCache(2 * MB)
    assert cache.admit("a", MB) is not None
    assert cache.acquire("a") is None and not cache.holds("a") and cache.pins("a") == 1
    cache.discard("a")
    assert cache.keys() == [] and cache.used_bytes == 0


def test_misuse_is_refused() -> None:
    cache = HostCache(2 * MB)
    filled(cache, "a", MB)
    with pytest.raises(KeyError, match="already in the host cache"):
        cache.admit("a", MB)
    with pytest.raises(KeyError, match="not pinned"):
        cache.release("a")
    with pytest.raises(ValueError):
        HostCache(-1)
    assert cache.admit("huge", 3 * MB) is None


class HostCacheMachine(RuleBasedStateMachine):
    """Random admits, fills, uses and releases against a model of the rules."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = HostCache(8 * MB)
        self.pins: dict[str, int] = {}       # the expected pins of each present key
        self.recency: list[str] = []         # present keys, least recently used first
        self.sizes: dict[str, int] = {}

    @rule(key=st.sampled_from("abcdefg"), megabytes=st.integers(1, 9))
    def admit(self, key: str, megabytes: int) -> None:
        if key in self.pins:
            return
        nbytes = megabytes * MB
        before = list(self.recency)
        buffer = self.cache.admit(key, nbytes)
        free = 8 * MB - sum(self.sizes.values())
        evictable = sum(self.sizes[k] for k in before if self.pins[k] == 0)
        assert (buffer is not None) == (free + evictable >= nbytes)
        if buffer is None:
            assert self.cache.keys() == before
            return
        evicted = [k for k in before if k not in self.cache.keys()]
        assert all(self.pins[k] == 0 for k in evicted)
        unpinned = [k for k in before if self.pins[k] == 0]
        assert evicted == unpinned[:len(evicted)]       # least recently used first
        for k in evicted:
            del self.pins[k], self.sizes[k]
            self.recency.remove(k)
        self.pins[key], self.sizes[key] = 1, nbytes
        self.recency.append(key)
        self.cache.complete(key)

    @rule(key=st.sampled_from("abcdefg"))
    def use(self, key: str) -> None:
        buffer = self.cache.acquire(key)
        assert (buffer is not None) == (key in self.pins)
        if buffer is not None:
            self.pins[key] += 1
            self.recency.remove(key)
            self.recency.append(key)

    @precondition(lambda self: any(self.pins.values()))
    @rule(data=st.data())
    def release(self, data) -> None:
        key = data.draw(st.sampled_from(sorted(k for k, n in self.pins.items() if n)))
        self.cache.release(key)
        self.pins[key] -= 1

    @invariant()
    def rules_hold(self) -> None:
        assert self.cache.used_bytes <= self.cache.budget
        assert self.cache.keys() == self.recency
        assert {k: self.cache.pins(k) for k in self.recency} == self.pins


TestHostCacheMachine = HostCacheMachine.TestCase
TestHostCacheMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
