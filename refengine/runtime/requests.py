"""The runtime's record of each request: the client's event queue, tokens so far, where it runs,
and a live migration in progress."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from refengine.engine.sequence import SamplingParams, SequenceState
from refengine.engine.step_result import TokenOutput
from refengine.runtime.api import Finished, GenerationEvent, TokenChunk


@dataclass
class Migration:
    """A live migration in progress: the destination, the sequence rebuilding the KV there and the
    tokens sent it; from the hand-over until the destination has taken the request over, the
    source it leaves."""

    destination: str
    seq_id: int
    sent: int = 0
    source: str | None = None


@dataclass
class LiveRequest:
    """One client request as the runtime follows it: its stream, its tokens so far, where it runs."""

    id: str
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    events: asyncio.Queue
    output_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    cold_start: bool = False
    cold_start_grace_s: float = 0.0
    instance: str | None = None
    seq_id: int | None = None
    done: bool = False
    migration: Migration | None = None
    state: SequenceState | None = None      # evicted: what its next instance adopts

    def finished(self, reason: str, now: float) -> Finished:
        ttft = (self.first_token_at or now) - self.arrival
        return Finished(reason, len(self.prompt_ids), len(self.output_ids), ttft, self.cold_start,
                        self.cold_start_grace_s)

    def cut_short(self, now: float, before_any_token: GenerationEvent) -> GenerationEvent:
        """The end of a stream stopped by the server: an aborted finish once tokens went out, else
        `before_any_token` (the client may retry a request that produced nothing)."""
        return self.finished("abort", now) if self.output_ids else before_any_token

    def stream(self, token: TokenOutput, now: float) -> None:
        """Send the client its next token."""
        self.output_ids.append(token.token_id)
        self.first_token_at = self.first_token_at or now
        self.events.put_nowait(TokenChunk(token.token_id, token.text, token.logprobs))

    def end(self, last: GenerationEvent) -> None:
        """Send the client its stream's last event; the runtime follows the request no further."""
        self.done = True
        self.events.put_nowait(last)
