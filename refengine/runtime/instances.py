"""One scheduler instance as it exists on a device: weights (or not yet), an engine `Instance`, and
which request each of its sequences serves.

Every method but the read-only ones and `load` (which hands its own jobs to the device) runs on the
device's worker thread. The scheduler names
requests by string id; the engine numbers sequences; this is the only place that maps the two. A
request migrating in is mapped to the sequence rebuilding its KV, so dropping it is an eviction.
"""
from __future__ import annotations

import threading
import time
from contextlib import suppress
from functools import partial
from typing import Callable

from kernels.interface import Kernels
from kernels.thread_tuner import ThreadCountTuner
from refengine.engine.instance import Instance
from refengine.engine.loader import with_fast_decode
from refengine.engine.sequence import SamplingParams, SequenceState
from refengine.engine.step_result import StepKind, StepResult
from refengine.engine.tokenizer import IncrementalDecoder, Tokenizer
from refengine.runtime.api import InstanceInfo
from refengine.store.cache import ModelFiles
from refengine.store.model_load import ModelLoad
from refengine.store.model_store import Lease, ModelStore


class LiveInstance:
    def __init__(self, name: str, node: str, model: str, weights: str):
        self.name, self.node, self.model, self.weights = name, node, model, weights
        self.engine: Instance | None = None
        self._lease: Lease | None = None             # the store's record of the weights held here
        self._kv_blocks = 0                          # the target, kept while no weights are loaded
        self._request_of: dict[int, str] = {}
        self._seq_of: dict[str, int] = {}
        self._before_load: list[tuple[int, Callable[[Instance], object]]] = []  # during a cold start
        self.failed = False                          # a job raised: the instance is gone for good

    # ---- memory actions
    def load(self, store: ModelStore, files: ModelFiles, kernels: Kernels, tokenizer: Tokenizer,
             tuner: ThreadCountTuner | None, submit: Callable[[Callable[[], None]], None],
             done: Callable[[float], None]) -> None:
        """Carry out a `Load` without holding the device, as SLINFER's separate loading queue
        assumes. `submit(job)` runs a job on the device's thread: one starts the load, another
        builds the engine once the bytes are in (milliseconds each), and other instances step in
        between while the store's threads read and copy. A load that is complete at once (views of
        the host cache on a CPU) finishes in its first job. Then `done(seconds)`, from the device's
        thread."""
        def begin() -> None:
            started = time.perf_counter()
            moving = self.begin_load(store, files, kernels)
            if moving.finished is not None:
                finish(started)
            else:
                threading.Thread(target=wait, args=(moving, started), name=f"await-{self.name}",
                                 daemon=True).start()

        def wait(moving: ModelLoad, started: float) -> None:
            with suppress(Exception):       # `finish` raises it again, on the device's thread
                moving.wait()
            submit(partial(finish, started))

        def finish(started: float) -> None:
            self.finish_load(tokenizer, tuner)
            done(time.perf_counter() - started)

        submit(begin)

    def begin_load(self, store: ModelStore, files: ModelFiles, kernels: Kernels) -> ModelLoad:
        """Start taking the weights from the store's nearest tier (on a CPU, views of the host-cache
        entry). The store's threads read and copy, so the device steps other instances meanwhile;
        call `finish_load` once the returned load's `wait()` is over."""
        self._lease = store.load(files, kernels, self.node)
        return self._lease.load

    def finish_load(self, tokenizer: Tokenizer, tuner: ThreadCountTuner | None) -> None:
        """The weights are in: build the engine and attach the requests that waited. A failed load
        raises its error here, on the device's thread, where it fails the instance."""
        model = with_fast_decode(self._lease.load.wait().model, tuner=tuner)
        self.engine = Instance(model, num_blocks=self._kv_blocks, fixed_pool=False,
                               new_detokenizer=partial(IncrementalDecoder, tokenizer))
        for _, apply in self._before_load:
            apply(self.engine)
        self._before_load.clear()

    def unload(self) -> None:
        """Drop weights and KV cache; any sequence still here is gone with them. The store hears of
        it last, once nothing here refers to the weights."""
        self.engine = None
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()
        self._request_of.clear()
        self._seq_of.clear()
        self._before_load.clear()

    def fail(self) -> None:
        """A job on this instance raised, leaving it in a state nobody can vouch for (a half-done
        step or resize): free what it holds and refuse any further job."""
        self.failed = True
        self.unload()

    def resize(self, blocks: int) -> None:
        self._kv_blocks = blocks
        if self.engine is not None:
            self.engine.resize_kv(blocks)

    def evict(self, request_ids: tuple[str, ...]) -> dict[str, SequenceState]:
        """Stop these requests (an eviction, or a migration's hand-over) and return the state of
        each one that had a sequence here, to continue it elsewhere without losing a token."""
        states = {}
        for request_id in request_ids:
            seq_id = self._unmap(request_id)
            if seq_id is not None and self.engine is not None:
                if (state := self.engine.export(seq_id)) is not None:
                    states[request_id] = state
        return states

    # ---- requests and steps
    def add(self, seq_id: int, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Attach a request; during a cold start it waits here until the weights are in."""
        self._apply(seq_id, request_id, lambda engine: engine.add_request(prompt_ids, params, seq_id=seq_id))

    def adopt(self, seq_id: int, request_id: str, state: SequenceState) -> None:
        """Continue a request evicted elsewhere as sequence `seq_id`, re-prefilled."""
        self._apply(seq_id, request_id, lambda engine: engine.adopt(seq_id, state))

    def prefetch(self, seq_id: int, request_id: str, token_ids: list[int]) -> None:
        """A live migration's rebuild: a request's tokens to recompute its KV from, as `seq_id`."""
        self._apply(seq_id, request_id, lambda engine: engine.prefetch(seq_id, token_ids))

    def take_over(self, seq_id: int, request_id: str, state: SequenceState) -> StepResult | None:
        """A live migration's hand-over: the request continues here from its rebuilt `seq_id`; the
        catch-up's result, if it made the request's next token (`Instance.take_over`). A hand-over
        follows the rebuild, so the weights are in."""
        if self.engine is None:
            raise RuntimeError(f"{self.name} was handed {request_id} before its weights were loaded")
        self._map(seq_id, request_id)
        return self.engine.take_over(seq_id, state)

    def _apply(self, seq_id: int, request_id: str, apply: Callable[[Instance], object]) -> None:
        if self.engine is None:
            self._before_load.append((seq_id, apply))
        else:
            apply(self.engine)
        self._map(seq_id, request_id)

    def _map(self, seq_id: int, request_id: str) -> None:
        self._request_of[seq_id] = request_id
        self._seq_of[request_id] = seq_id

    def abort_request(self, request_id: str) -> None:
        seq_id = self._unmap(request_id)
        if seq_id is not None and self.engine is not None:
            self.engine.abort(seq_id)

    def _unmap(self, request_id: str) -> int | None:
        """Forget the request's sequence here (and anything it left for after the load)."""
        seq_id = self._seq_of.pop(request_id, None)
        if seq_id is not None:
            self._request_of.pop(seq_id, None)
            self._before_load = [entry for entry in self._before_load if entry[0] != seq_id]
        return seq_id

    def step(self, kind: str) -> StepResult | None:
        return self.engine.step(StepKind(kind)) if self.engine is not None else None

    def request_of(self, seq_id: int) -> str | None:
        return self._request_of.get(seq_id)

    def forget(self, seq_id: int) -> str | None:
        """A sequence finished: drop it from the maps and return its request id."""
        request_id = self._request_of.pop(seq_id, None)
        if request_id is not None:
            self._seq_of.pop(request_id, None)
        return request_id

    # ---- read-only figures
    @property
    def kv_blocks_used(self) -> int:
        return self.engine.kv.num_used_blocks if self.engine is not None else 0

    @property
    def memory_bytes(self) -> int:
        engine = self.engine
        if engine is None:
            return 0
        return engine.model.weights.nbytes() + engine.kv.num_blocks * engine.kv.bytes_per_block

    def info(self) -> InstanceInfo:
        engine = self.engine
        return InstanceInfo(
            instance=self.name, model=self.model, device=self.node, loaded=engine is not None,
            running=len(engine.running) if engine else 0, waiting=len(engine.waiting) if engine else 0,
            kv_blocks_used=self.kv_blocks_used, kv_blocks_total=engine.kv.num_blocks if engine else 0,
            memory_bytes=self.memory_bytes)
