"""A request's state inside one instance: its tokens, its KV blocks, and how it samples and stops."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernels.reference import SamplingSettings
from refengine.engine.text_stream import TextStream


MAX_LOGPROBS = 20    # alternatives reported per token: OpenAI's top_logprobs limit


class RequestError(ValueError):
    """A request the engine refuses, with a one-line message fit for a user (CLI or HTTP 400)."""


class ContextLengthError(RequestError):
    """The prompt, or the prompt plus max_tokens, does not fit the model's context (OpenAI's
    `context_length_exceeded`: clients shorten the conversation on this one and retry)."""


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # some of its tokens are not in the KV cache yet: needs a prefill iteration
    RUNNING = "running"    # all but its newest token are cached: advances one token per decode iteration
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"          # end-of-sequence token or a stop string (OpenAI's "stop")
    LENGTH = "length"      # max_tokens or the context limit (OpenAI's "length")
    ABORT = "abort"        # cancelled by the caller (client gone, evicted by the scheduler)


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks for. `validate` turns nonsense into a RequestError before any work."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # trace replay and benchmarks force an exact output length
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, added to its logit before the pick)
    logprobs: int | None = None   # report each new token's log-probability and this many alternatives

    def validate(self, prompt_len: int, max_model_len: int) -> None:
        if prompt_len == 0:
            raise RequestError("the prompt is empty")
        if prompt_len >= max_model_len:
            raise ContextLengthError(f"the prompt has {prompt_len} tokens; this model's context is "
                                     f"{max_model_len} tokens and at least one must be left to generate")
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if prompt_len + self.max_tokens > max_model_len:
            raise ContextLengthError(f"the prompt ({prompt_len} tokens) plus max_tokens ({self.max_tokens}) "
                                     f"exceeds this model's context of {max_model_len} tokens")
        if not self.temperature >= 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop strings must be non-empty strings")
        if any(not -100 <= bias <= 100 for _, bias in self.logit_bias):
            raise RequestError("logit_bias values must be in [-100, 100]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def needs_host_logits(self) -> bool:
        """Whether picking this request's token needs its logits on the host: a draw, a bias or
        penalty, or log-probabilities to report. Otherwise a greedy pick stays on the device."""
        return not self.settings.greedy or self.settings.adjusts_logits or self.logprobs is not None

    @property
    def settings(self) -> SamplingSettings:
        return SamplingSettings(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                                logit_bias=self.logit_bias)


@dataclass(eq=False)
class Sequence:
    """One request being generated. Its tokens are prompt_ids + output_ids; the first
    num_cached_tokens of them have keys and values in the cache blocks listed in block_table."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    finish_reason: FinishReason | None = None
    catching_up: bool = False   # migrating in: its KV is rebuilt from its tokens, nothing sampled
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        # a per-request generator: the same seed gives the same draws whatever shares the batch
        self.rng = np.random.default_rng(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_uncached_tokens(self) -> int:
        """Tokens the next iteration must feed: the prompt (or its rest) in a prefill, 1 in a decode.
        A sequence catching up holds its newest token back, as a running one does, so the instance
        that adopts it has a token to feed and logits to sample its next one from."""
        return self.num_tokens - self.num_cached_tokens - (1 if self.catching_up else 0)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(frozen=True)
class SequenceState:
    """What a sequence needs to continue on another instance of the same model: its tokens (the KV
    is recomputed from them, ServerlessLLM's token-based migration) and how it samples and stops,
    so that the tokens it goes on to produce are the ones it would have produced where it was.

    `text` is moved, not copied: the instance that exported the sequence has dropped it.
    """

    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    params: SamplingParams
    rng_state: dict[str, Any]          # the sampler's generator (numpy bit_generator.state)
    text: TextStream                   # detokenizer bytes held back, stop-string window

    @property
    def token_ids(self) -> list[int]:
        return [*self.prompt_ids, *self.output_ids]
