"""The JSON shapes of OpenAI's responses: `chat.completion` / `text_completion` and their stream chunks.

Chat and text completions differ only in how one choice's text is wrapped (`message` / `delta` vs
`text`) and in the object names; `Shape` holds those differences, `Envelope` everything else, so
the generation path above never branches on the endpoint.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Shape:
    object: str          # a whole response
    chunk_object: str    # one server-sent event of a stream
    id_prefix: str
    chat: bool

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
        """One choice of a whole response; `logprobs` as `LogprobsWriter` renders them, if asked for."""
        body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {"index": index, **body, "finish_reason": finish_reason, "logprobs": logprobs}

    def delta(self, index: int, text: str, finish_reason: str | None, first: bool,
              logprobs: dict | None = None) -> dict:
        """A stream chunk's choice. A chat stream names the role in each choice's first chunk, and its
        closing chunk carries the finish reason with an empty delta, as OpenAI's does."""
        if not self.chat:
            return self.choice(index, text, finish_reason, logprobs)
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}


CHAT = Shape(object="chat.completion", chunk_object="chat.completion.chunk", id_prefix="chatcmpl-", chat=True)
COMPLETION = Shape(object="text_completion", chunk_object="text_completion", id_prefix="cmpl-", chat=False)


@dataclass
class Envelope:
    """The fields every response and chunk of one request repeats: id, creation time, model."""

    shape: Shape
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or self.shape.id_prefix + uuid.uuid4().hex

    def response(self, choices: list[dict], usage: dict) -> dict:
        return {"id": self.id, "object": self.shape.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": self.shape.chunk_object, "created": self.created, "model": self.model,
                "choices": choices}
        return body | ({"usage": usage} if usage is not None else {})
