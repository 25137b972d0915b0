"""A `Runtime` for server tests: one real `Instance` per catalogue model, stepped by an asyncio task.

It keeps the protocol's promises honestly: tokens arrive as steps produce them, then one Finished;
bad requests raise RequestError before any token; closing the iterator early aborts the sequence
between steps, which frees its KV blocks. Model code runs in a worker thread (`asyncio.to_thread`);
requests join and leave only between steps, on the loop. What a test needs to check the server is
recorded (`requests`, `cancelled`), and faults can be injected (`overloaded`, `fail_after_tokens`).
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from functools import partial
from typing import AsyncIterator

from models.catalogue import Catalogue
from refengine.engine.instance import Instance
from refengine.engine.loader import LoadedModel
from refengine.engine.sequence import RequestError, SamplingParams
from refengine.engine.step_result import StepResult
from refengine.engine.tokenizer import IncrementalDecoder, Tokenizer
from refengine.runtime.api import (Finished, GenerationEvent, InstanceInfo, Overloaded, RuntimeStatus,
                                   SloOverride, TokenChunk)

DEVICE = "cpu"


@dataclass
class _Live:
    """A sequence inside an instance, and the queue its generate() call reads."""

    instance: Instance
    arrived: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    first_token_at: float | None = None


@dataclass(frozen=True)
class SeenRequest:
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    slo: SloOverride | None


class FakeRuntime:
    def __init__(self, catalogue: Catalogue, loaded: LoadedModel, num_blocks: int = 256):
        self.catalogue = catalogue
        self.loaded = loaded
        self.instances = {name: Instance(loaded.model, num_blocks,
                                         new_detokenizer=partial(IncrementalDecoder, loaded.tokenizer))
                          for name in catalogue.names}
        self.requests: list[SeenRequest] = []
        self.cancelled: list[int] = []       # seq ids whose iterator was closed before they finished
        self.overloaded: str | None = None    # set: the next requests are dropped with this reason
        self.fail_after_tokens: int | None = None  # set: streams raise RuntimeError after this many tokens
        self.step_delay_s = 0.0               # slows each step (in the worker thread) for disconnect tests
        self._ids = itertools.count()
        self._live: dict[int, _Live] = {}
        self._inbox: list[tuple[int, list[int], SamplingParams, _Live, asyncio.Future]] = []
        self._aborts: list[int] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle (the app's lifespan)
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    # ------------------------------------------------------------------ the Runtime protocol
    def tokenizer(self, model: str) -> Tokenizer:
        self.catalogue[model]
        return self.loaded.tokenizer

    async def generate(self, model: str, prompt_ids: list[int], params: SamplingParams,
                       slo: SloOverride | None = None) -> AsyncIterator[GenerationEvent]:
        instance = self.instances[self.catalogue[model].name]
        self.requests.append(SeenRequest(model, list(prompt_ids), params, slo))
        if self.overloaded:
            raise Overloaded(self.overloaded, retry_after_s=2.5)
        seq_id, live = next(self._ids), _Live(instance, time.perf_counter())
        accepted = asyncio.get_running_loop().create_future()
        self._inbox.append((seq_id, list(prompt_ids), params, live, accepted))
        self._wake.set()
        done, tokens = False, 0
        try:
            await accepted
            while not done:
                event = await live.events.get()
                done = isinstance(event, Finished)
                tokens += not done
                if self.fail_after_tokens is not None and tokens > self.fail_after_tokens:
                    raise RuntimeError("injected runtime failure")
                yield event
        except RequestError:
            done = True
            raise
        finally:
            if not done:
                self.cancelled.append(seq_id)
                self._aborts.append(seq_id)
                self._wake.set()

    def status(self) -> RuntimeStatus:
        infos = [InstanceInfo(instance=f"{name}@{DEVICE}", model=name, device=DEVICE, loaded=True,
                              running=len(inst.running), waiting=len(inst.waiting),
                              kv_blocks_used=inst.kv.num_used_blocks, kv_blocks_total=inst.kv.num_blocks,
                              memory_bytes=0) for name, inst in self.instances.items()]
        return RuntimeStatus(instances=infos, device_memory_budget={DEVICE: 1 << 30},
                             device_memory_optimistic={DEVICE: 0}, device_memory_actual={DEVICE: 0})

    def loaded_models(self) -> set[str]:
        return set(self.instances)

    @property
    def blocks_in_use(self) -> int:
        return sum(inst.kv.num_used_blocks for inst in self.instances.values())

    # ------------------------------------------------------------------ the stepping loop
    async def _run(self) -> None:
        while True:
            self._admit_and_abort()
            busy = [inst for inst in self.instances.values() if inst.has_work]
            if not busy:
                await self._wake.wait()
                self._wake.clear()
                continue
            for instance in busy:
                result = await asyncio.to_thread(self._step, instance)
                if result is not None:
                    self._deliver(result)

    def _step(self, instance: Instance) -> StepResult | None:
        result = instance.step()
        time.sleep(self.step_delay_s)
        return result

    def _admit_and_abort(self) -> None:
        for seq_id, prompt_ids, params, live, accepted in self._inbox:
            if accepted.cancelled():
                continue
            try:
                live.instance.add_request(prompt_ids, params, seq_id=seq_id)
            except RequestError as e:
                accepted.set_exception(e)
                continue
            self._live[seq_id] = live
            accepted.set_result(None)
        self._inbox.clear()
        for seq_id in self._aborts:
            if (live := self._live.pop(seq_id, None)) is not None:
                live.instance.abort(seq_id)
        self._aborts.clear()

    def _deliver(self, result: StepResult) -> None:
        now = time.perf_counter()
        for token in result.tokens:
            live = self._live[token.seq_id]
            live.first_token_at = live.first_token_at or now
            live.events.put_nowait(TokenChunk(token.token_id, token.text))
        for done in result.finished:
            live = self._live.pop(done.seq_id)
            live.events.put_nowait(Finished(done.reason.value, done.num_prompt_tokens, done.num_output_tokens,
                                            ttft_s=(live.first_token_at or now) - live.arrived, cold_start=False))
