"""A simulated instance: the sequences an engine would hold, and how long its steps take.

It mirrors `Instance.step()` of the real engine (DESIGN.md): a prefill iteration runs every waiting
prompt at once and yields each its next token; a decode iteration yields one token for every
running sequence. A *rebuild* (live migration's copy of another instance's request) is prefilled
like a prompt but yields nothing and waits, KV held, for its hand-over, or for another round
(`extend`: the tokens its source made since, prefilled on top of the KV it holds); there, as
`Instance.take_over()` does, a catch-up prefill of the tokens the source made meanwhile yields the
request's next token (`take_over`, then `caught_up`). Step time is the profiled
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
    source: str | None = None   # a rebuild: the instance whose sequence it copies
    cached: int = 0             # tokens whose KV it holds already (a rebuild's earlier rounds)

    @property
    def context(self) -> int:
        return self.input_tokens + self.generated

    @property
    def rebuild(self) -> bool:
        return self.source is not None


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
    handing: dict[str, Sequence] = field(default_factory=dict)     # in their hand-over's catch-up
    ending: dict[str, Sequence] = field(default_factory=dict)      # finished by the latest step
    kv_used: int = 0
    running_context: int = 0
    kv_overflows: int = 0
    _running_ids: tuple[str, ...] | None = None

    def add(self, seq: Sequence) -> None:
        self.waiting[seq.request_id] = seq

    def remove(self, request_id: str) -> Sequence | None:
        """Drop a sequence (waiting, running, rebuilt or handing over) and its KV; returns it."""
        seq = self.waiting.pop(request_id, None)
        if seq is not None:
            self.kv_used -= self.model.blocks_for(seq.cached)
        held = self.rebuilt.pop(request_id, None) or self.handing.pop(request_id, None)
        if held is not None:
            self.kv_used -= self.model.blocks_for(held.context)
            return held
        if (running := self.running.pop(request_id, None)) is not None:
            self.kv_used -= self.model.blocks_for(running.context)
            self.running_context -= running.context
            self._running_ids = None
            return running
        return seq

    def extend(self, request_id: str, generated: int) -> None:
        """Another round of the rebuild of `request_id`: its source has `generated` tokens now; the
        next prefill feeds those it lacks, on top of the KV it holds."""
        copy = self.rebuilt.pop(request_id)
        copy.cached, copy.generated = copy.context, generated
        self.waiting[request_id] = copy

    def decoding(self, request_id: str) -> Sequence:
        """The running (or handing-over) sequence of `request_id`; or the one the step in flight
        ends (its state was advanced when the step began; the scheduler learns at its end)."""
        return self.running.get(request_id) or self.handing.get(request_id) \
            or self.ending[request_id]

    def take_over(self, seq: Sequence) -> int:
        """The hand-over of a live migration: `seq`, rebuilt here up to an earlier context, goes on
        here at its current one. Returns the tokens its catch-up prefill feeds (those the source
        made since the rebuild, and the newest, which the rebuild left for the next pass): 0 when
        the rebuild reached the newest token, and the sequence joins the decode batch at once.
        Otherwise it waits in `handing`, its KV reserved, until `caught_up`."""
        gap = seq.context - self.remove(seq.request_id).context
        self.kv_used += self.model.blocks_for(seq.context)
        if gap == 0:
            self._run(seq)
            return 0
        self.handing[seq.request_id] = seq
        return gap + 1

    def caught_up(self, request_id: str) -> tuple[str, ...]:
        """The catch-up prefill of the handing-over `request_id` ended and made its next token: it
        decodes on, or it ended (its KV freed). Returns the ids that ended."""
        seq = self.handing.pop(request_id)
        if seq.context % self.model.block_tokens == 0:
            self.kv_used += 1
        seq.generated += 1
        if seq.generated >= seq.output_tokens:
            self.kv_used -= self.model.blocks_for(seq.context)
            return (request_id,)
        self._run(seq)
        return ()

    def _run(self, seq: Sequence) -> None:
        self.running_context += seq.context
        self.running[seq.request_id] = seq
        self._running_ids = None

    def has_work(self, kind: str) -> bool:
        return bool(self.waiting) if kind == "prefill" else bool(self.running or self.handing)

    def step(self, kind: str) -> StepOutcome:
        """Run one iteration of `kind`; sequences that reach their output length finish."""
        blocks_for = self.model.blocks_for
        if kind == "prefill":
            batch = list(self.waiting.values())
            self.waiting.clear()
            elapsed = self.table.prefill(sum(s.context - s.cached for s in batch))
            for s in batch:
                self.kv_used += blocks_for(s.context + (0 if s.rebuild else 1)) - blocks_for(s.cached)
                if s.rebuild:
                    self.rebuilt[s.request_id] = s
                    continue
                s.generated += 1
                self._run(s)
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
        self.ending = {s.request_id: s for s in batch if s.generated >= s.output_tokens}
        finished = tuple(self.ending)
        for rid in finished:
            self.remove(rid)
        if self.kv_used > self.kv_blocks:
            self.kv_overflows += 1
        return StepOutcome(kind, advanced, finished, elapsed, len(batch))
