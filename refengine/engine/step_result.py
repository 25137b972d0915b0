"""What one engine iteration did: the only report `Instance.step()` gives, and all a caller needs
(the scheduler's cost figures, the server's token stream, a learner's trace line)."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from refengine.engine.sequence import FinishReason


class StepKind(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class TokenLogprobs:
    """What the model thought of one new token: its log-probability and the likeliest alternatives
    (natural log, from the raw logits: before bias, penalties and temperature)."""

    logprob: float
    top: tuple[tuple[int, float], ...]     # (token id, log-probability), most likely first


@dataclass(frozen=True)
class TokenOutput:
    seq_id: int
    token_id: int
    text: str            # the text this token made safe to show (may be "" or several characters)
    logprobs: TokenLogprobs | None = None  # only when the request asked for them


@dataclass(frozen=True)
class FinishedSequence:
    seq_id: int
    reason: FinishReason
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass(frozen=True)
class StepResult:
    kind: StepKind
    seq_ids: tuple[int, ...]               # sequences this iteration advanced
    num_tokens: int                        # tokens fed through the model (prompt chunk, or 1 per sequence)
    context_tokens: int                    # sum of the advanced sequences' context lengths after the step
    tokens: tuple[TokenOutput, ...]        # new tokens (a prefill chunk that ends mid-prompt makes none)
    finished: tuple[FinishedSequence, ...]
    preempted: tuple[int, ...]             # sequences pushed back to waiting to free KV blocks
    blocks_used: int
    blocks_total: int
    elapsed_s: float

    @property
    def batch_size(self) -> int:
        return len(self.seq_ids)

    def trace_line(self, step_index: int) -> str:
        """One human-readable line per step for `generate --trace`."""
        finished = f" finished={[f.seq_id for f in self.finished]}" if self.finished else ""
        preempted = f" preempted={list(self.preempted)}" if self.preempted else ""
        return (f"step {step_index:4d} {self.kind.value:7s} batch={self.batch_size:3d} tokens={self.num_tokens:5d} "
                f"kv={self.blocks_used}/{self.blocks_total} blocks {self.elapsed_s * 1e3:8.1f} ms{finished}{preempted}")
