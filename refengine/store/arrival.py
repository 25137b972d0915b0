"""Which parts of a model are resident while its chunks land: execute-while-load's bookkeeping.

λScale runs a model while its blocks are still arriving; on one machine that means a cold instance's
first prefill starts once the embedding and the first layers are in, each layer waiting only for its
own weights. The loader calls `landed(i)` as chunk i reaches the device (any order, any thread);
the forward pass calls `wait(part)` (`models.llama.WeightArrival`). A failed load wakes every waiter
with its error instead of leaving a forward pass blocked on bytes that will never come.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from refengine.store.packed import PackedIndex


class PartArrival:
    def __init__(self, index: PackedIndex, on_complete: Callable[[BaseException | None], None] | None = None):
        """on_complete(error): called once, on the thread that lands the last chunk or fails the load."""
        self._lock = threading.Lock()
        self._missing = {part.name: set(index.chunks_of(part)) for part in index.parts}
        self._parts_of: dict[int, list[str]] = {}
        for part in index.parts:
            for chunk in index.chunks_of(part):
                self._parts_of.setdefault(chunk, []).append(part.name)
        self._events = {name: threading.Event() for name in self._missing}
        self._chunks_left = len(index.chunks)
        self._finishing = False                  # the outcome is decided; `_done` is set once on_complete ran
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._on_complete = on_complete
        self.ready_at: dict[str, float] = {}      # part -> time.perf_counter() when it became resident
        for name, chunks in self._missing.items():
            if not chunks:
                self._ready(name)
        if self._chunks_left == 0:
            self._finishing = True
            self._finish(None)

    def landed(self, chunk: int) -> None:
        with self._lock:
            if self._finishing:
                return
            for name in self._parts_of.get(chunk, ()):
                self._missing[name].discard(chunk)
                if not self._missing[name]:
                    self._ready(name)
            self._chunks_left -= 1
            self._finishing = self._chunks_left == 0
            last = self._finishing
        if last:
            self._finish(None)

    def fail(self, error: BaseException) -> None:
        """Stop the load: every current and later `wait` raises `error` (the first one reported)."""
        with self._lock:
            if self._finishing:
                return
            self._finishing = True
            self._error = error
            for event in self._events.values():
                event.set()
        self._finish(error)

    def wait(self, part: str) -> None:
        """Return once `part` is resident. A part the model does not have (a tied lm_head) has
        nothing to wait for."""
        event = self._events.get(part)
        if event is not None:
            event.wait()
        if self._error is not None:
            raise self._error

    def wait_all(self, timeout: float | None = None) -> bool:
        """Block until every chunk has landed (raising the load's error); False on timeout."""
        if not self._done.wait(timeout):
            return False
        if self._error is not None:
            raise self._error
        return True

    @property
    def complete(self) -> bool:
        return self._done.is_set() and self._error is None

    def _ready(self, name: str) -> None:
        self.ready_at[name] = time.perf_counter()
        self._events[name].set()

    def _finish(self, error: BaseException | None) -> None:
        on_complete, self._on_complete = self._on_complete, None   # once; and no cycle keeps the loader alive
        try:
            if on_complete is not None:
                on_complete(error)
        finally:
            self._done.set()
