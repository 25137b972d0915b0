"""A `Runtime` wrapper for server tests: what the server asked, what it closed early, and faults.

It delegates to a real runtime and records each request and each iterator the server closed before
its Finished event (a cancellation). It can also inject what a real runtime does rarely and
unpredictably: drop requests (`overloaded`), fail mid-stream (`fail_after_tokens`), or be slow to a
first token (`first_token_delay_s`, a cold start). Its own generator closes the wrapped one on every
exit, so the runtime underneath sees each cancellation and failure as the server caused it.
"""
from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator

from refengine.engine.sequence import SamplingParams
from refengine.engine.tokenizer import Tokenizer
from refengine.runtime.api import Finished, GenerationEvent, Overloaded, Runtime, RuntimeStatus, SloOverride


@dataclass(frozen=True)
class SeenRequest:
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    slo: SloOverride | None


class ProbeRuntime:
    def __init__(self, inner: Runtime):
        self.inner = inner
        self.catalogue = inner.catalogue
        self.requests: list[SeenRequest] = []
        self.cancelled = 0
        self.heal()

    def heal(self) -> None:
        """No faults: what every test starts with."""
        self.overloaded: str | None = None
        self.fail_after_tokens: int | None = None
        self.first_token_delay_s = 0.0

    async def start(self) -> None:
        await self.inner.start()

    def shut_down(self) -> None:
        self.inner.shut_down()

    async def stop(self) -> None:
        await self.inner.stop()

    def tokenizer(self, model: str) -> Tokenizer:
        return self.inner.tokenizer(model)

    def context_length(self, model: str) -> int:
        return self.inner.context_length(model)

    def status(self) -> RuntimeStatus:
        return self.inner.status()

    def loaded_models(self) -> set[str]:
        return self.inner.loaded_models()

    async def generate(self, model: str, prompt_ids: list[int], params: SamplingParams,
                       slo: SloOverride | None = None) -> AsyncIterator[GenerationEvent]:
        self.requests.append(SeenRequest(model, list(prompt_ids), params, slo))
        if self.overloaded:
            raise Overloaded(self.overloaded, retry_after_s=2.5)
        finished, tokens = False, 0
        try:
            async with aclosing(self.inner.generate(model, prompt_ids, params, slo)) as events:
                async for event in events:
                    finished = isinstance(event, Finished)
                    tokens += not finished
                    if tokens == 1 and not finished:
                        await asyncio.sleep(self.first_token_delay_s)
                    if self.fail_after_tokens is not None and tokens > self.fail_after_tokens:
                        raise RuntimeError("injected runtime failure")
                    yield event
        except Exception:
            finished = True   # an error, not a cancellation
            raise
        finally:
            if not finished:
                self.cancelled += 1

    def idle(self) -> bool:
        """No sequence left on any instance, and no KV block held by one."""
        return all(i.running == i.waiting == i.kv_blocks_used == 0 for i in self.status().instances)
