"""What the HTTP server needs from the live runtime, and nothing more.

The server turns OpenAI requests into token ids and `SamplingParams`, calls `Runtime.generate`, and
turns the events back into JSON or server-sent events. It never sees instances, devices or the
scheduler. Closing the async iterator early (a client that went away) cancels the request: the
runtime aborts its sequence and frees its KV blocks before the device's next step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from models.catalogue import Catalogue
from refengine.engine.sequence import SamplingParams
from refengine.engine.step_result import TokenLogprobs
from refengine.engine.tokenizer import Tokenizer


class Overloaded(Exception):
    """The scheduler dropped the request: its SLO cannot be met now (HTTP 429 with Retry-After)."""

    def __init__(self, reason: str, retry_after_s: float = 1.0):
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class ShuttingDown(Exception):
    """The server is stopping: a request that has produced no token yet ends with this (HTTP 503);
    one that has ends with finish reason "abort"."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down")


class DeviceFailure(Exception):
    """A job on the request's instance raised (a weight load, a step, a KV resize, an eviction): the
    instance is gone, and the request with it (HTTP 500). Other requests and models carry on; the
    model's next request starts a new instance."""


@dataclass(frozen=True)
class SloOverride:
    """Per-request SLOs in seconds (None = the scheduler's defaults, SLINFER §6.1)."""

    ttft_s: float | None = None
    tpot_s: float | None = None


@dataclass(frozen=True)
class TokenChunk:
    token_id: int
    text: str                       # text this token released (may be "")
    logprobs: TokenLogprobs | None = None   # when the request asked for them


@dataclass(frozen=True)
class Finished:
    reason: str                     # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float                   # arrival to first token
    cold_start: bool                # the request waited for an instance to load
    cold_start_grace_s: float = 0.0  # that wait, which extends its TTFT SLO (SLINFER §4.5); 0 when warm


GenerationEvent = TokenChunk | Finished


@dataclass(frozen=True)
class InstanceInfo:
    instance: str
    model: str
    device: str
    loaded: bool
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    memory_bytes: int


@dataclass
class RuntimeStatus:
    """A snapshot for /metrics and /health."""

    instances: list[InstanceInfo] = field(default_factory=list)
    device_memory_budget: dict[str, int] = field(default_factory=dict)     # bytes the scheduler may use
    device_memory_optimistic: dict[str, int] = field(default_factory=dict)  # scheduler's admitted targets
    device_memory_actual: dict[str, int] = field(default_factory=dict)      # what is really allocated
    host_cache_budget: int = 0       # the model store's host tier: its byte budget
    host_cache_used: int = 0         # and the bytes of the models it holds (CPU instances' weights are views)
    cold_starts: int = 0
    preemptions: int = 0
    drops: int = 0
    failures: int = 0                # instances lost because a job on their device raised
    migrations: int = 0              # running requests live-migrated to another instance


class Runtime(Protocol):
    catalogue: Catalogue

    def tokenizer(self, model: str) -> Tokenizer:
        """The model's tokenizer (raises UnknownModelError for a name not in the catalogue)."""

    def context_length(self, model: str) -> int:
        """Tokens the model attends over, prompt and output together (raises UnknownModelError)."""

    def generate(self, model: str, prompt_ids: list[int], params: SamplingParams,
                 slo: SloOverride | None = None) -> AsyncIterator[GenerationEvent]:
        """Tokens as they are produced, then one Finished. Raises UnknownModelError, RequestError
        (bad parameters or prompt too long, before any token), Overloaded (dropped) or
        DeviceFailure (its instance failed, before or after tokens)."""

    def status(self) -> RuntimeStatus: ...

    def loaded_models(self) -> set[str]: ...
