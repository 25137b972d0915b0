"""A simulated instance: the sequences an engine would hold, and how long its steps take.

It mirrors `Instance.step()` of the real engine (DESIGN.md): a prefill iteration runs every waiting
prompt at once and yields each its next token; a decode iteration yields one token for every
running sequence. A *rebuild* (live migration's copy of another instance's request) is prefilled
like a prompt but yields nothing and waits, KV held, for its hand-over. Step time is the profiled
latency of the (model, hardware) table — the truth of the simulator — so the scheduler's estimates
differ from it only by their safety margin.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from scheduler import LatencyTable, ModelSpec


@dataclass
class Sequence:
    request_id: str
    input_tokens: int
    generated: int
    output_tokens: int
    rebuild: bool = False

    @property
    def context(self) -> int:
        return self.input_tokens + self.generated


@dataclass
class StepOutcome:
    kind: str
    sequences: tuple[str, ...]
    finished: tuple[str, ...]
    elapsed: float
    batch: int


@dataclass
class SimInstance:
    instance_id: str
    node: str
    model: ModelSpec
    table: LatencyTable
    weights: bool = False
    kv_blocks: int = 0
    waiting: dict[str, Sequence] = field(default_factory=dict)
    running: dict[str, Sequence] = field(default_factory=dict)
    rebuilt: dict[str, Sequence] = field(default_factory=dict)
    kv_used: int = 0
    running_context: int = 0
    kv_overflows: int = 0
    _running_ids: tuple[str, ...] | None = None

    def add(self, seq: Sequence) -> None:
        self.waiting[seq.request_id] = seq

    def remove(self, request_id: str) -> Sequence | None:
        """Drop a sequence (waiting, running or rebuilt) and its KV; returns it."""
        seq = self.waiting.pop(request_id, None)
        if (rebuilt := self.rebuilt.pop(request_id, None)) is not None:
            self.kv_used -= self.model.blocks_for(rebuilt.context)
            return rebuilt
        if (running := self.running.pop(request_id, None)) is not None:
            self.kv_used -= self.model.blocks_for(running.context)
            self.running_context -= running.context
            self._running_ids = None
            return running
        return seq

    def take_over(self, seq: Sequence) -> None:
        """The hand-over of a live migration: `seq`, rebuilt here up to an earlier context,
        joins the decode batch at its current one (the gap's KV is taken in with it)."""
        self.remove(seq.request_id)
        self.kv_used += self.model.blocks_for(seq.context)
        self.running_context += seq.context
        self.running[seq.request_id] = seq
        self._running_ids = None

    def has_work(self, kind: str) -> bool:
        return bool(self.waiting) if kind == "prefill" else bool(self.running)

    def step(self, kind: str) -> StepOutcome:
        """Run one iteration of `kind`; sequences that reach their output length finish."""
        blocks_for = self.model.blocks_for
        if kind == "prefill":
            batch = list(self.waiting.values())
            self.waiting.clear()
            elapsed = self.table.prefill(sum(s.context for s in batch))
            for s in batch:
                self.kv_used += blocks_for(s.context + (0 if s.rebuild else 1))
                if s.rebuild:
                    self.rebuilt[s.request_id] = s
                    continue
                s.generated += 1
                self.running_context += s.context
                self.running[s.request_id] = s
            self._running_ids = None
            batch = [s for s in batch if not s.rebuild]
            advanced = tuple(s.request_id for s in batch)
        else:
            batch = list(self.running.values())
            n = len(batch)
            elapsed = self.table.decode(n, self.running_context / n)
            self.running_context += n
            bt = self.model.block_tokens
            for s in batch:
                if s.context % bt == 0:
                    self.kv_used += 1
                s.generated += 1
            if self._running_ids is None:
                self._running_ids = tuple(self.running)
            advanced = self._running_ids
        finished = tuple(s.request_id for s in batch if s.generated >= s.output_tokens)
        for rid in finished:
            self.remove(rid)
        if self.kv_used > self.kv_blocks:
            self.kv_overflows += 1
        return StepOutcome(kind, advanced, finished, elapsed, len(batch))
