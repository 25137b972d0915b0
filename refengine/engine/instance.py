"""One model on one device, advanced one engine iteration at a time.

`Instance.step()` is the only thing that runs the model. Each call is either a prefill iteration
(the waiting prompts that fit a token budget, a long prompt in chunks) or a decode iteration (one new
token for every running sequence), never both: SLINFER times and schedules the two kinds apart
(§4.2.3). Sequences join and leave between steps, which is all continuous batching is.

A sequence's uncached tokens are what an iteration feeds: its whole prompt (or the rest of it) in a
prefill, its newest token in a decode. When an iteration leaves a sequence fully cached, the logits of
its last token pick the next one. A sequence preempted for KV space loses its cache and simply
becomes waiting again: its next prefill recomputes prompt and output alike.

Live migration moves a sequence between instances by its tokens (ServerlessLLM §4): `export` stops
it here and returns its `SequenceState`; on the destination, `prefetch` has its KV rebuilt by
prefill iterations while it still runs elsewhere (a *catching-up* sequence, never sampled), and
`take_over` makes it the real sequence: it prefills the tokens the source made meanwhile and samples
the next one from that same pass, then decodes on from the next step. `adopt` continues an exported
sequence from scratch instead: its next prefill recomputes everything (re-placement after an
eviction), as a preempted sequence's does.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Callable

import numpy as np

from kernels.interface import Array
from kernels.reference import sample, top_logprobs
from models.llama import LlamaModel, StepInputs
from refengine.engine.kv_cache import PagedKVCache, ResizeReport
from refengine.engine.sequence import (FinishReason, RequestError, SamplingParams, Sequence, SequenceState,
                                       SequenceStatus)
from refengine.engine.step_result import FinishedSequence, StepKind, StepResult, TokenLogprobs, TokenOutput
from refengine.engine.text_stream import Detokenizer, TextStream


class _NoText:
    """Detokenizer for token-only use (random-weight models in tests, benchmarks)."""

    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


Scheduled = list[tuple[Sequence, int]]  # (sequence, tokens it feeds this iteration)


class Instance:
    def __init__(self, model: LlamaModel, num_blocks: int, *, block_tokens: int = 16,
                 max_model_len: int | None = None, max_prefill_tokens: int = 2048, max_running: int = 256,
                 new_detokenizer: Callable[[], Detokenizer] | None = None, fixed_pool: bool = True):
        """fixed_pool: the KV pool never grows, so a request that cannot fit it alone is refused at
        once. Under the scheduler (serving) the pool is resized to demand instead (SLINFER §4.3)."""
        self.model = model
        self.fixed_pool = fixed_pool
        self.kv = PagedKVCache(model.config, model.kernels, num_blocks, block_tokens)
        self.max_model_len = min(model.config.max_position_embeddings, max_model_len or 1 << 62)
        self.max_prefill_tokens = max_prefill_tokens
        self.max_running = max_running
        self.new_detokenizer = new_detokenizer or _NoText
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.incoming: dict[int, Sequence] = {}     # catching up: migrating in, not yet adopted
        self._streams: dict[int, TextStream] = {}
        self._ids = itertools.count()

    # ---------------------------------------------------------------- requests in and out
    def add_request(self, prompt_ids: list[int], params: SamplingParams, seq_id: int | None = None) -> Sequence:
        """Queue a request for the next prefill. Raises RequestError for input it can never serve."""
        params.validate(len(prompt_ids), self.max_model_len)
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must lie in [0, {vocab})")
        if any(not 0 <= t < vocab for t, _ in params.logit_bias):
            raise RequestError(f"logit_bias token ids must lie in [0, {vocab})")
        needed = self.kv.blocks_for(len(prompt_ids) + params.max_tokens)
        if self.fixed_pool and needed > self.kv.num_blocks:
            raise RequestError(f"the request needs {needed} KV blocks but this instance's cache has "
                               f"{self.kv.num_blocks}; grow the cache or lower max_tokens")
        seq = Sequence(next(self._ids) if seq_id is None else seq_id, list(prompt_ids), params)
        self._streams[seq.seq_id] = TextStream(self.new_detokenizer(), params.stop)
        self.waiting.append(seq)
        return seq

    def abort(self, seq_id: int) -> FinishedSequence | None:
        """Cancel a sequence now (between steps): its blocks go back to the pool at once."""
        seq = self._take(seq_id)
        return self._finish(seq, FinishReason.ABORT) if seq is not None else None

    def _take(self, seq_id: int) -> Sequence | None:
        """Remove a sequence from whichever queue holds it (it keeps its blocks)."""
        if seq_id in self.incoming:
            return self.incoming.pop(seq_id)
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.seq_id == seq_id:
                    queue.remove(seq)
                    return seq
        return None

    @property
    def sequences(self) -> list[Sequence]:
        """Every sequence holding KV blocks, catching-up ones included."""
        return list(self.waiting) + self.running + list(self.incoming.values())

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._catching_up())

    def _catching_up(self) -> list[Sequence]:
        return [seq for seq in self.incoming.values() if seq.num_uncached_tokens > 0]

    # ---------------------------------------------------------------- live migration
    def export(self, seq_id: int) -> SequenceState | None:
        """Stop a sequence between steps and return what it needs to continue on another instance of
        this model; its blocks go back to the pool. None if this instance does not hold it."""
        seq = self._take(seq_id)
        if seq is None:
            return None
        self.kv.release(seq)
        if seq.catching_up:                     # it runs elsewhere: nothing here to continue
            return None
        return SequenceState(tuple(seq.prompt_ids), tuple(seq.output_ids), seq.params,
                             seq.rng.bit_generator.state, self._streams.pop(seq.seq_id))

    def prefetch(self, seq_id: int, token_ids: list[int]) -> None:
        """Have the KV of `token_ids` rebuilt as the catching-up sequence `seq_id` (more tokens
        extend it): prefill iterations compute all but the newest token and sample nothing. The
        tokens are those of a sequence this model runs elsewhere."""
        seq = self.incoming.get(seq_id)
        if seq is None:
            seq = self.incoming[seq_id] = Sequence(seq_id, [], SamplingParams(), catching_up=True)
        seq.prompt_ids.extend(token_ids)

    def take_over(self, seq_id: int, state: SequenceState) -> StepResult | None:
        """A migration's hand-over: the exported sequence continues here as the catching-up `seq_id`
        (or from scratch if there is none), and decodes on from the next step. The tokens the source
        made since the rebuild are prefilled now — the one pause the client sees — and that pass's
        last logits give the next token (sampled with the state's generator), so the client waits
        for one weight pass, not that one and a decode. Its result, as a prefill step's; None when
        the rebuild already reached the newest token, which the next decode then feeds with the
        other running sequences'."""
        started = time.perf_counter()
        seq = self._continue(seq_id, state)
        if seq.num_uncached_tokens <= 1:
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            return None
        seq.status = SequenceStatus.WAITING     # a prompt part-cached: sampling makes it running
        self.waiting.appendleft(seq)
        while True:
            n = min(seq.num_uncached_tokens, self.max_prefill_tokens)
            if not self.kv.reserve(seq, seq.num_cached_tokens + n):
                raise RuntimeError(f"no KV blocks left to take over sequence {seq_id}")
            last = n == seq.num_uncached_tokens
            caught_up = self._iterate([(seq, n)], StepKind.PREFILL, [], started)
            if last:
                return caught_up

    def adopt(self, seq_id: int, state: SequenceState) -> Sequence:
        """Continue an exported sequence here as `seq_id`, re-prefilled: its next prefill feeds every
        token (those a catching-up `seq_id` rebuilt excepted) and samples its next one with the
        state's generator."""
        seq = self._continue(seq_id, state)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        return seq

    def _continue(self, seq_id: int, state: SequenceState) -> Sequence:
        seq = self.incoming.pop(seq_id, None) or Sequence(seq_id, [], state.params)
        if seq.token_ids != state.token_ids[:seq.num_tokens]:
            raise ValueError(f"sequence {seq_id} rebuilt tokens that are not a prefix of the ones it continues")
        seq.prompt_ids, seq.output_ids = list(state.prompt_ids), list(state.output_ids)
        seq.params, seq.catching_up = state.params, False
        seq.rng.bit_generator.state = state.rng_state
        self._streams[seq_id] = state.text
        return seq

    def resize_kv(self, num_blocks: int) -> ResizeReport:
        return self.kv.resize(num_blocks, self.sequences)

    # ---------------------------------------------------------------- one iteration
    def step(self, kind: StepKind | None = None) -> StepResult | None:
        """Run one iteration: a prefill if a waiting prompt fits, else a decode; or only the `kind`
        asked for (a scheduler grant names it). None if there is nothing of that kind to do."""
        started = time.perf_counter()
        kind, scheduled, preempted = self._schedule(kind)
        if not scheduled:
            return None
        return self._iterate(scheduled, kind, preempted, started)

    def _iterate(self, scheduled: Scheduled, kind: StepKind, preempted: list[Sequence],
                 started: float) -> StepResult:
        """Run the model over what was scheduled, sample every sequence it left fully cached, and
        report the iteration."""
        inputs, logits = self._forward(scheduled, kind)
        completed = [i for i, (seq, _) in enumerate(scheduled)
                     if seq.num_uncached_tokens == 0 and not seq.catching_up]
        picks = self._sample([scheduled[i][0] for i in completed], logits, completed)
        tokens, finished = [], []
        for i, (token_id, logprobs) in zip(completed, picks):
            seq = scheduled[i][0]
            text, reason = self._append(seq, token_id)
            tokens.append(TokenOutput(seq.seq_id, token_id, text, logprobs))
            if reason is not None:
                finished.append(self._finish(seq, reason))
            elif seq.status is SequenceStatus.WAITING:
                self.waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
        return StepResult(
            kind=kind, seq_ids=tuple(seq.seq_id for seq, _ in scheduled),
            num_tokens=int(len(inputs.token_ids)), context_tokens=int(inputs.context_lens.sum()),
            tokens=tuple(tokens), finished=tuple(finished), preempted=tuple(s.seq_id for s in preempted),
            blocks_used=self.kv.num_used_blocks, blocks_total=self.kv.num_blocks,
            elapsed_s=time.perf_counter() - started)

    # ---------------------------------------------------------------- steps of a step
    def _schedule(self, only: StepKind | None) -> tuple[StepKind, Scheduled, list[Sequence]]:
        """Prefill if any waiting prompt fits; otherwise decode every running sequence, preempting
        the youngest ones if the pool cannot give each its next slot."""
        prefill = self._schedule_prefill() if only is not StepKind.DECODE else []
        if prefill or only is StepKind.PREFILL:
            return StepKind.PREFILL, prefill, []
        scheduled: Scheduled = []
        preempted: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            while not self.kv.reserve(seq, seq.num_tokens):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append((seq, 1))
        return StepKind.DECODE, scheduled, preempted

    def _schedule_prefill(self) -> Scheduled:
        budget, scheduled = self.max_prefill_tokens, []
        for seq in [*self.waiting, *self._catching_up()]:
            if budget == 0 or len(self.running) + len(scheduled) >= self.max_running:
                break
            n = min(seq.num_uncached_tokens, budget)
            if not self.kv.reserve(seq, seq.num_cached_tokens + n):
                break
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def _forward(self, scheduled: Scheduled, kind: StepKind) -> tuple[StepInputs, Array]:
        """Run the model over the scheduled tokens, which are then cached; return inputs and logits."""
        inputs = self._step_inputs(scheduled, kind)
        logits = self.model.forward(inputs, self.kv.k, self.kv.v)
        for seq, n in scheduled:
            seq.num_cached_tokens += n
        return inputs, logits

    def _step_inputs(self, scheduled: Scheduled, kind: StepKind) -> StepInputs:
        starts = [seq.num_cached_tokens for seq, _ in scheduled]
        counts = [n for _, n in scheduled]
        width = max(len(seq.block_table) for seq, _ in scheduled)
        tables = np.full((len(scheduled), width), -1, dtype=np.int32)
        for b, (seq, _) in enumerate(scheduled):
            tables[b, :len(seq.block_table)] = seq.block_table
        return StepInputs(
            is_prefill=kind is StepKind.PREFILL,
            token_ids=np.concatenate([seq.token_ids[s:s + n] for (seq, n), s in zip(scheduled, starts)]).astype(np.int64),
            positions=np.concatenate([np.arange(s, s + n) for s, n in zip(starts, counts)]).astype(np.int64),
            slot_mapping=np.concatenate([self.kv.slots(seq, s, s + n) for (seq, n), s in zip(scheduled, starts)]),
            block_tables=tables,
            query_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
            context_lens=np.asarray([s + n for s, n in zip(starts, counts)], dtype=np.int32),
        )

    def _sample(self, seqs: list[Sequence], logits, rows: list[int]) -> list[tuple[int, TokenLogprobs | None]]:
        """Each sequence's next token, and its log-probabilities where asked for. Greedy batches
        stay on the device (only the ids come back); any other pick needs the logits on the host."""
        if not seqs:
            return []
        kern = self.model.kernels
        if not any(seq.params.needs_host_logits for seq in seqs):
            return [(int(t), None) for t in kern.argmax(logits)[rows]]
        host = kern.to_numpy(logits)
        picks = []
        for seq, row in zip(seqs, rows):
            token_id = sample(host[row], seq.params.settings, seq.rng, seq.output_ids)
            wanted = seq.params.logprobs
            picks.append((token_id, None if wanted is None else TokenLogprobs(*top_logprobs(host[row], token_id, wanted))))
        return picks

    def _append(self, seq: Sequence, token_id: int) -> tuple[str, FinishReason | None]:
        """Record a new token; return the text it releases and why the sequence ends, if it does."""
        seq.output_ids.append(token_id)
        stream = self._streams[seq.seq_id]
        if token_id == self.model.config.eos_token_id and not seq.params.ignore_eos:
            return stream.finish(), FinishReason.STOP
        text = stream.push(token_id)
        if stream.stopped:
            return text, FinishReason.STOP
        if len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
            return text + stream.finish(), FinishReason.LENGTH
        return text, None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: FinishReason) -> FinishedSequence:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.release(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self._streams.pop(seq.seq_id, None)     # a catching-up sequence has none
        return FinishedSequence(seq.seq_id, reason, len(seq.prompt_ids), len(seq.output_ids))
