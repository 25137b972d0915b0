"""Token ids to streamed text, with stop strings.

A stop string can span several tokens, so text that might be the start of one is held back until the
next token settles it; once a stop string appears, the text ends right before it. The client never
sees a stop string, nor text that comes after one.
"""
from __future__ import annotations

from typing import Protocol


class Detokenizer(Protocol):
    """Per-sequence incremental decoding (holds back incomplete UTF-8 sequences)."""

    def push(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


class TextStream:
    def __init__(self, decoder: Detokenizer, stop: tuple[str, ...] = ()):
        self.decoder = decoder
        self.stop = stop
        self.text = ""       # everything decoded so far (cut at a stop string once one is found)
        self.emitted = 0     # how much of `text` the caller has been given
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now safe to show."""
        self.text += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence ended for another reason: return whatever is still held back."""
        self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        cut = self._first_stop()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            end = cut
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._held_back()
        delta, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return delta

    def _first_stop(self) -> int | None:
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, self.emitted - len(s) + 1))) >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.emitted), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest
