"""Text <-> token ids for a prepared model, its chat template, and streaming detokenization.

Encoding adds no BOS/EOS (SmolLM2's chat template writes `<|im_start|>` itself); special-token
strings written in text are matched as single tokens, as in transformers and llama.cpp.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import tokenizers
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers.decoders import ByteLevel, DecodeStream

from refengine.store.cache import ModelFiles


def _raise_exception(message: str) -> None:
    """Templates call `raise_exception(...)` to reject a conversation (HF convention)."""
    raise TemplateError(message)


# Same settings as transformers' `apply_chat_template`, so templates written for it render the same.
_TEMPLATES = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
_TEMPLATES.globals["raise_exception"] = _raise_exception


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE (GPT-2's) writes each byte as one printable character: the printable Latin-1
    bytes as themselves, the other 68 (controls, space, soft hyphen...) as U+0100 onwards in byte
    order. This is its inverse: vocabulary character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


_BYTE_OF_CHAR = _byte_level_alphabet()


class Tokenizer:
    """The tokenizer of one prepared model (`ModelFiles` or its directory)."""

    def __init__(self, files: ModelFiles | Path | str):
        files = files if isinstance(files, ModelFiles) else ModelFiles(Path(files))
        self.backend = tokenizers.Tokenizer.from_file(str(files.tokenizer))
        config = json.loads(files.tokenizer_config.read_text())
        self.special_tokens = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.eos_token_id: int = self.backend.token_to_id(config["eos_token"])
        self.chat_template = _TEMPLATES.from_string(config["chat_template"])

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for. A byte-level BPE token can hold part of a character
        (an emoji spans several tokens), so bytes, not text, are what add up exactly; OpenAI's
        logprobs report them for that reason."""
        added = self._added_tokens.get(token_id)
        if added is not None:
            return added.encode()
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        if isinstance(self.backend.decoder, ByteLevel):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        return self.decode([token_id]).encode()

    @functools.cached_property
    def _added_tokens(self) -> dict[int, str]:
        return {i: t.content for i, t in self.backend.get_added_tokens_decoder().items()}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation ([{"role": ..., "content": ...}, ...]) as the prompt text."""
        _check_messages(messages)
        try:
            return self.chat_template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                             **self.special_tokens)
        except TemplateError as e:
            raise ValueError(f"chat template rejected the messages: {e}") from None


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': str, 'content': str}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be {{'role': str, 'content': str}}, got {m!r:.80}")


class IncrementalDecoder:
    """Decodes one sequence token by token, yielding only complete characters.

    Byte-level BPE splits a multi-byte character (emoji, CJK) across tokens; its first tokens alone
    decode to U+FFFD. `push` holds such bytes back until the character completes, so the concatenated
    deltas plus `flush()` equal `Tokenizer.decode` of all the ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._held: list[int] = []  # ids pushed since the last text was returned

    def push(self, token_id: int) -> str:
        """The text this token completes ("" while a character is still incomplete)."""
        self._held.append(token_id)
        delta = self._stream.step(self.tokenizer.backend, token_id)
        if delta is None:
            return ""
        self._held.clear()
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes to U+FFFD); the decoder starts afresh."""
        rest = self.tokenizer.decode(self._held, self.skip_special_tokens)
        self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
        self._held = []
        return rest
