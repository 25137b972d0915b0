"""One HTTP request's generations: n choices per prompt, each a `Runtime.generate` stream, merged.

Each choice runs in its own asyncio task that only forwards the runtime's events into one queue, so
the choices advance concurrently while the consumer (an SSE stream or the non-streaming collector)
reads a single sequence of deltas. Closing the generation cancels the tasks and each task closes its
runtime iterator: that is what tells the runtime to abort the request (client gone, a sibling choice
failed), so it must happen on every exit path.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Callable

from refengine.engine.sequence import SamplingParams
from refengine.runtime.api import Finished, GenerationEvent, Runtime, SloOverride, TokenChunk
from refengine.server.logprobs import ScoredToken


@dataclass(frozen=True)
class Choice:
    index: int            # position in the response's `choices`
    prompt: int           # which of the request's prompts it continues
    sample: int           # which of that prompt's n samples it is
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Delta:
    index: int
    text: str
    finish_reason: str | None = None
    scored: ScoredToken | None = None      # the new token and its log-probabilities, when asked for


class StreamEndedEarly(RuntimeError):
    """The runtime's iterator stopped without a Finished event (a runtime bug, reported as HTTP 500)."""


OnFinished = Callable[[Finished, float | None], None]  # (the choice's Finished, its mean TPOT in seconds)


class Generation:
    def __init__(self, runtime: Runtime, model: str, choices: list[Choice], slo: SloOverride | None,
                 on_finished: OnFinished):
        self.choices = choices
        self.finished: dict[int, Finished] = {}
        self._on_finished = on_finished
        self._queue: asyncio.Queue[tuple[int, GenerationEvent | Exception]] = asyncio.Queue()
        self._first_token_at: dict[int, float] = {}
        self._last_token_at: dict[int, float] = {}
        self._tasks = [asyncio.create_task(self._forward(runtime, model, c, slo)) for c in choices]

    async def _forward(self, runtime: Runtime, model: str, choice: Choice, slo: SloOverride | None) -> None:
        finished = False
        try:
            async with aclosing(runtime.generate(model, choice.prompt_ids, choice.params, slo)) as events:
                async for event in events:
                    if isinstance(event, TokenChunk):
                        now = time.perf_counter()
                        self._first_token_at.setdefault(choice.index, now)
                        self._last_token_at[choice.index] = now
                    finished = finished or isinstance(event, Finished)
                    self._queue.put_nowait((choice.index, event))
            if not finished:
                raise StreamEndedEarly(f"the runtime's stream for choice {choice.index} ended without finishing")
        except Exception as e:  # handed to the consumer, which turns it into an HTTP error
            self._queue.put_nowait((choice.index, e))

    async def next(self) -> Delta | None:
        """The next delta of any choice; None once all have finished. Raises what the runtime raised."""
        if len(self.finished) == len(self.choices):
            return None
        index, event = await self._queue.get()
        if isinstance(event, Exception):
            raise event
        if isinstance(event, TokenChunk):
            scored = None if event.logprobs is None else (event.token_id, event.logprobs)
            return Delta(index, event.text, scored=scored)
        self.finished[index] = event
        self._on_finished(event, self._tpot(index, event))
        return Delta(index, "", event.reason)

    def _tpot(self, index: int, finished: Finished) -> float | None:
        """Mean time per output token after the first, as the server saw the tokens arrive."""
        if finished.completion_tokens < 2 or index not in self._first_token_at:
            return None
        return (self._last_token_at[index] - self._first_token_at[index]) / (finished.completion_tokens - 1)

    def usage(self) -> dict[str, int | float]:
        """OpenAI's usage: a prompt counts once however many choices continue it. One extension,
        `cold_start_grace_s`: how long the request waited for its model to load (SLINFER §4.5: its
        TTFT SLO is extended by that much), 0 when the model was warm, so a client can judge SLOs."""
        prompt = sum(self.finished[c.index].prompt_tokens for c in self.choices if c.sample == 0)
        completion = sum(f.completion_tokens for f in self.finished.values())
        grace = max((f.cold_start_grace_s for f in self.finished.values()), default=0.0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "cold_start_grace_s": round(grace, 4)}

    async def aclose(self) -> None:
        """Cancel the choices still generating and wait until every runtime iterator is closed. A finished
        choice's iterator is left to end by itself: closing it would read as a cancellation."""
        for choice, task in zip(self.choices, self._tasks):
            if choice.index not in self.finished:
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
