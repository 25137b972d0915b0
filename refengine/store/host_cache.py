"""The host-memory tier: whole models kept in RAM under a byte budget (ServerlessLLM's DRAM cache).

Rules it keeps, whatever the order of calls:
- the bytes of all entries never exceed `budget`;
- a pinned entry (being filled, or in use by a model on a device) is never evicted;
- otherwise entries are evicted least recently used first, and only when a new one needs the room:
  `admit` evicts nothing unless evicting makes the new entry fit.

An entry is `admit`ted pinned and empty, filled by its loader, then `complete`d; only complete entries
are found by `acquire`. Every `acquire` (and the `admit`) is paired with one `release`.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from refengine.store.chunked_read import aligned_empty


@dataclass
class _Entry:
    buffer: np.ndarray
    pins: int = 1
    complete: bool = False

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)


class HostCache:
    def __init__(self, budget: int, allocate: Callable[[int], np.ndarray] = aligned_empty):
        """allocate(nbytes) -> flat uint8 buffer: page-aligned memory, or pinned memory for GPU copies."""
        if budget < 0:
            raise ValueError("the host cache budget cannot be negative")
        self.budget = budget
        self._allocate = allocate
        self._entries: OrderedDict[str, _Entry] = OrderedDict()   # least recently used first
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- the loader's side
    def acquire(self, key: str) -> np.ndarray | None:
        """The complete entry's buffer, pinned and marked most recently used; None if not cached."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not entry.complete:
                return None
            entry.pins += 1
            self._entries.move_to_end(key)
            return entry.buffer

    def admit(self, key: str, nbytes: int) -> np.ndarray | None:
        """A new pinned, empty entry of `nbytes`, evicting unpinned entries LRU-first to make room;
        None (and nothing evicted) if it cannot fit beside the pinned ones."""
        with self._lock:
            if key in self._entries:
                raise KeyError(f"{key!r} is already in the host cache")
            victims = self._victims(nbytes)
            if victims is None:
                return None
            for victim in victims:
                del self._entries[victim]
            entry = _Entry(self._allocate(nbytes))
            self._entries[key] = entry
            return entry.buffer

    def complete(self, key: str) -> None:
        """The entry's bytes are all there: later `acquire`s may use it."""
        with self._lock:
            self._entries[key].complete = True

    def release(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.pins == 0:
                raise KeyError(f"{key!r} is not pinned in the host cache")
            entry.pins -= 1

    def discard(self, key: str) -> None:
        """Drop an entry whatever its state (a fill that failed); its pins go with it."""
        with self._lock:
            self._entries.pop(key, None)

    def _victims(self, nbytes: int) -> list[str] | None:
        free = self.budget - self._used_bytes()
        victims = []
        for key, entry in self._entries.items():
            if free >= nbytes:
                break
            if entry.pins == 0:
                victims.append(key)
                free += entry.nbytes
        return victims if free >= nbytes else None

    # ---------------------------------------------------------------- what the store reports
    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used_bytes()

    def _used_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def holds(self, key: str) -> bool:
        """A complete copy of `key` is in host memory."""
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.complete

    def pins(self, key: str) -> int:
        with self._lock:
            entry = self._entries.get(key)
            return entry.pins if entry is not None else 0

    def keys(self) -> list[str]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)
