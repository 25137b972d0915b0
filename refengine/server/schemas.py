"""The request bodies of the OpenAI API that refengine accepts, as pydantic models.

Ranges follow OpenAI's API reference (temperature in [0, 2], top_p in (0, 1]) so a bad value is
refused with the name of the offending field before any work; the engine's `SamplingParams.validate`
still checks what only the runtime knows (prompt length against the model's context).

A field that would change what comes back, and that refengine does not implement, is refused with
a 400 rather than ignored: tools and functions, a `response_format` other than text, audio,
`echo`, `suffix`, `best_of` above 1. A
client that asked for them would otherwise take plain text for what it asked. Fields that only
label or route a request (`user`, `metadata`, `store`, ...) are ignored. `logprobs` and `logit_bias`
are implemented. Extensions, marked as such, are vLLM's `top_k` and `ignore_eos` (trace replay needs
exact output lengths) and `slo`, which OpenAI has no field for.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from models.catalogue import SamplingDefaults
from refengine.engine.sequence import MAX_LOGPROBS, SamplingParams
from refengine.engine.tokenizer import Tokenizer
from refengine.runtime.api import SloOverride
from refengine.server.errors import APIError
from refengine.server.responses import CHAT, COMPLETION, Shape

MAX_CHOICES = 64            # prompts x n of one request: each is a sequence in the runtime
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat's is the rest of the context

Seconds = Annotated[float, Field(gt=0)]
StopString = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SloRequest(BaseModel):
    """Extension: per-request SLOs in seconds (default: SLINFER §6.1's, from the prompt length)."""

    ttft_s: Seconds | None = None
    tpot_s: Seconds | None = None


class GenerationRequest(BaseModel):
    """What chat and text completions share: the model, sampling, stopping, streaming, SLOs."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None          # extension (vLLM)
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    seed: int | None = None
    stop: StopString | list[StopString] | None = None
    ignore_eos: bool = False                                   # extension (vLLM)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None   # token id -> bias
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    slo: SloRequest | None = None                              # extension (refengine)

    shape: ClassVar[Shape]

    @field_validator("logit_bias")
    @classmethod
    def _keys_are_token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias and not all(key.isdigit() for key in bias):
            raise ValueError("keys must be token ids, written as decimal strings")
        return bias

    def check_token_ids(self, vocab_size: int) -> None:
        """Token ids in the request must exist in the model's vocabulary."""
        if any(int(key) >= vocab_size for key in self.logit_bias or ()):
            raise APIError(400, f"logit_bias token ids must lie in [0, {vocab_size})", param="logit_bias")

    @property
    def requested_logprobs(self) -> int | None:
        """How many alternatives to report per token (0: only the token's own), None: no logprobs."""
        return None

    def prompt_ids(self, tokenizer: Tokenizer) -> list[list[int]]:
        """The token ids of each prompt (chat: one, rendered through the model's chat template)."""
        raise NotImplementedError

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def output_limit(self, room: int) -> int:
        """max_tokens, or the endpoint's default; `room` is what the context leaves after the prompt."""
        return self.max_tokens or COMPLETION_MAX_TOKENS

    def sampling_params(self, choice: int, room: int, defaults: SamplingDefaults) -> SamplingParams:
        """Parameters of the choice-th generation: with a seed, choice i draws with seed + i, so the
        n choices differ yet the whole response is reproducible. Fields left out take the model's
        `defaults`."""
        return SamplingParams(
            max_tokens=self.output_limit(room),
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            seed=None if self.seed is None else self.seed + choice,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            ignore_eos=self.ignore_eos,
            logit_bias=tuple((int(key), bias) for key, bias in (self.logit_bias or {}).items()),
            logprobs=self.requested_logprobs)

    def slo_override(self, ttft_header: float | None, tpot_header: float | None) -> SloOverride | None:
        """The body's `slo` field wins over the X-SLO-* headers, field by field."""
        ttft = self.slo.ttft_s if self.slo and self.slo.ttft_s is not None else ttft_header
        tpot = self.slo.tpot_s if self.slo and self.slo.tpot_s is not None else tpot_header
        return None if ttft is None and tpot is None else SloOverride(ttft_s=ttft, tpot_s=tpot)


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None  # None: an assistant turn that only called tools

    def flat(self, index: int) -> dict[str, str]:
        """{"role", "content": str} as chat templates expect; text parts are joined with newlines
        (as vLLM does), anything else (images, audio) is refused. OpenAI's `developer` is its newer
        name for `system`, which is the role chat templates know."""
        role = "system" if self.role == "developer" else self.role
        if self.content is None or isinstance(self.content, str):
            return {"role": role, "content": self.content or ""}
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"messages[{index}].content: only text parts are supported, got type {part.type!r}")
        return {"role": role, "content": "\n".join(part.text for part in self.content)}


class ResponseFormat(BaseModel):
    type: Literal["text"]        # JSON mode and JSON schemas need constrained decoding: refused


class ChatCompletionRequest(GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None        # refused unless empty
    functions: list[dict] | None = None    # (tools' deprecated name)
    tool_choice: Literal["none", "auto"] | None = None     # "required" or a named tool: refused
    modalities: list[Literal["text"]] | None = None        # audio output: refused
    audio: None = None

    shape: ClassVar[Shape] = CHAT

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, tools: list[dict] | None) -> list[dict] | None:
        if tools:
            raise ValueError("refengine does not call tools or functions; send the request without them")
        return tools

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    @property
    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def output_limit(self, room: int) -> int:
        return self.max_completion_tokens or self.max_tokens or room

    def prompt_ids(self, tokenizer: Tokenizer) -> list[list[int]]:
        try:
            text = tokenizer.apply_chat_template([m.flat(i) for i, m in enumerate(self.messages)])
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        return [tokenizer.encode(text)]


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(GenerationRequest):
    """`prompt` is a string, token ids, or a batch of either; each prompt gets n choices."""

    prompt: str | TokenIds | list[str] | list[TokenIds]
    echo: Literal[False] = False  # refused rather than silently ignored: it changes the text returned
    suffix: None = None           # insertion (fill in the middle): refused
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None   # server-side reranking: refused above 1
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None   # OpenAI allows 5; vLLM more

    shape: ClassVar[Shape] = COMPLETION

    @property
    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def prompt_ids(self, tokenizer: Tokenizer) -> list[list[int]]:
        if isinstance(self.prompt, str) or (self.prompt and all(isinstance(t, int) for t in self.prompt)):
            prompts = [self.prompt]
        else:
            prompts = list(self.prompt) or [[]]
        if any(t >= tokenizer.vocab_size for p in prompts if not isinstance(p, str) for t in p):
            raise APIError(400, f"prompt token ids must lie in [0, {tokenizer.vocab_size})", param="prompt")
        return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
