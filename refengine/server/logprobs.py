"""Token log-probabilities in OpenAI's two JSON shapes: chat's list of entries, completions' columns.

The engine reports ids and natural-log probabilities (`TokenLogprobs`); only here do ids become
text. Chat gives each token its text, its UTF-8 bytes (a token may hold part of a character, so
only the bytes add up exactly) and its alternatives. Completions give parallel lists, the
alternatives as {text: logprob} maps, and each token's character offset in the completion text
(from the completion's start: refengine does not echo the prompt). The end-of-sequence token that
ends a choice is reported too, as usage counts it, though it adds no text. One `LogprobsWriter` serves one
response and keeps each choice's running offset, so a stream's chunks continue where the last ended.
"""
from __future__ import annotations

from collections import defaultdict

from refengine.engine.step_result import TokenLogprobs
from refengine.engine.tokenizer import Tokenizer

ScoredToken = tuple[int, TokenLogprobs]     # a new token's id and what the model thought of it


class LogprobsWriter:
    def __init__(self, tokenizer: Tokenizer, chat: bool):
        self.tokenizer = tokenizer
        self.chat = chat
        self._offsets: dict[int, int] = defaultdict(int)    # choice -> characters written so far

    def render(self, index: int, tokens: list[ScoredToken]) -> dict:
        """The `logprobs` object of choice `index` for these tokens (the next ones it produced)."""
        return self._chat(tokens) if self.chat else self._completion(index, tokens)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    def _entry(self, token_id: int, logprob: float) -> dict:
        raw = self.tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def _chat(self, tokens: list[ScoredToken]) -> dict:
        content = [self._entry(token_id, scored.logprob)
                   | {"top_logprobs": [self._entry(alt, lp) for alt, lp in scored.top]}
                   for token_id, scored in tokens]
        return {"content": content, "refusal": None}

    def _completion(self, index: int, tokens: list[ScoredToken]) -> dict:
        texts, offsets = [], []
        for token_id, _ in tokens:
            texts.append(self._text(token_id))
            offsets.append(self._offsets[index])
            self._offsets[index] += len(texts[-1])
        return {"tokens": texts, "token_logprobs": [scored.logprob for _, scored in tokens],
                "top_logprobs": [{self._text(alt): lp for alt, lp in scored.top} for _, scored in tokens],
                "text_offset": offsets}
