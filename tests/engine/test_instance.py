"""Instance.step() on a tiny random model: batching, chunking, preemption, resize, stops, accounting."""
from __future__ import annotations

import pytest

from refengine.engine.instance import Instance
from refengine.engine.sequence import ContextLengthError, FinishReason, RequestError, SamplingParams
from refengine.engine.step_result import StepKind
from tests.conftest import random_prompt, run_to_end

LENGTHS = [1, 5, 15, 16, 17, 40]


def greedy(max_tokens=12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)


def outputs_alone(model, prompts, params) -> list[list[int]]:
    out = []
    for p in prompts:
        inst = Instance(model, num_blocks=64)
        seq = inst.add_request(p, params)
        run_to_end(inst)
        out.append(seq.output_ids)
    return out


@pytest.fixture(scope="module")
def prompts():
    return [random_prompt(n, seed=n) for n in LENGTHS]


@pytest.fixture(scope="module")
def expected(tiny_model, prompts):
    return outputs_alone(tiny_model, prompts, greedy())


def test_batched_equals_one_by_one(tiny_model, prompts, expected):
    inst = Instance(tiny_model, num_blocks=64)
    seqs = [inst.add_request(p, greedy()) for p in prompts]
    results = run_to_end(inst)
    assert [s.output_ids for s in seqs] == expected
    assert results[0].kind is StepKind.PREFILL and results[0].batch_size == len(prompts)
    assert {r.kind for r in results[1:]} == {StepKind.DECODE}
    assert inst.kv.num_free_blocks == inst.kv.num_blocks


def test_sequences_join_mid_batch(tiny_model, prompts, expected):
    inst = Instance(tiny_model, num_blocks=64)
    seqs = []
    for p in prompts:                      # a newcomer every two steps, while others decode
        seqs.append(inst.add_request(p, greedy()))
        inst.step()
        inst.step()
    run_to_end(inst)
    assert [s.output_ids for s in seqs] == expected


def test_chunked_prefill_equals_whole_prefill(tiny_model, prompts, expected):
    inst = Instance(tiny_model, num_blocks=64, max_prefill_tokens=7)
    seqs = [inst.add_request(p, greedy()) for p in prompts]
    results = run_to_end(inst)
    assert [s.output_ids for s in seqs] == expected
    assert max(r.num_tokens for r in results if r.kind is StepKind.PREFILL) <= 7


def test_preemption_when_blocks_run_out_keeps_tokens(tiny_model, prompts, expected):
    inst = Instance(tiny_model, num_blocks=7)          # too few for all six at once
    seqs = [inst.add_request(p, greedy()) for p in prompts]
    results = run_to_end(inst)
    assert any(r.preempted for r in results)
    assert [s.output_ids for s in seqs] == expected
    assert inst.kv.num_used_blocks == 0


def test_resize_grow_and_shrink_mid_generation(tiny_model, prompts, expected):
    inst = Instance(tiny_model, num_blocks=20)
    seqs = [inst.add_request(p, greedy()) for p in prompts]
    inst.step(), inst.step()
    grown = inst.resize_kv(40)
    assert grown.blocks_copied == inst.kv.num_used_blocks and inst.kv.num_blocks == 40
    inst.step()
    inst.resize_kv(inst.kv.num_used_blocks + 3)
    with pytest.raises(ValueError, match="in use"):
        inst.resize_kv(inst.kv.num_used_blocks - 1)
    run_to_end(inst)
    assert [s.output_ids for s in seqs] == expected


def test_seeded_sampling_reproduces_and_ignores_batch_mates(tiny_model, prompts):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=42, ignore_eos=True)
    alone = outputs_alone(tiny_model, prompts[:1], params)[0]
    inst = Instance(tiny_model, num_blocks=64)
    seq = inst.add_request(prompts[0], params)
    for p in prompts[1:]:
        inst.add_request(p, SamplingParams(max_tokens=10, temperature=1.2, seed=7, ignore_eos=True))
    run_to_end(inst)
    assert seq.output_ids == alone


def test_kv_blocks_all_return_after_finish_abort_and_failure(tiny_model, prompts):
    inst = Instance(tiny_model, num_blocks=32)
    keep = inst.add_request(prompts[4], greedy(max_tokens=6))
    dropped = inst.add_request(prompts[5], greedy(max_tokens=30))
    never_started = inst.add_request(prompts[3], greedy())
    inst.step()
    assert inst.abort(dropped.seq_id).reason is FinishReason.ABORT
    assert inst.abort(never_started.seq_id) is not None
    assert inst.abort(12345) is None
    with pytest.raises(RequestError):
        inst.add_request([], greedy())
    run_to_end(inst)
    assert keep.finish_reason is FinishReason.LENGTH and len(keep.output_ids) == 6
    assert inst.kv.num_free_blocks == inst.kv.num_blocks and not inst.has_work


def test_eos_stops_unless_ignored(tiny_model, prompts, expected):
    eos = expected[2][3]                     # pretend the 4th greedy token is end-of-sequence
    model = tiny_model
    original = model.config
    object.__setattr__(model, "config", original.__class__(**{**vars(original), "eos_token_id": eos}))
    try:
        inst = Instance(model, num_blocks=64)
        seq = inst.add_request(prompts[2], SamplingParams(max_tokens=12))
        run_to_end(inst)
        assert seq.output_ids == expected[2][:expected[2].index(eos) + 1]
        assert seq.finish_reason is FinishReason.STOP
    finally:
        object.__setattr__(model, "config", original)


class Letters:
    """Detokenizer stand-in: token t is the letter chr(ord('a') + t % 26)."""

    def push(self, token_id):
        return chr(ord("a") + token_id % 26)

    def flush(self):
        return ""


def test_stop_string_cuts_text_across_tokens(tiny_model, prompts, expected):
    text = "".join(chr(ord("a") + t % 26) for t in expected[1])
    stop = text[4:7]                          # spans three tokens
    inst = Instance(tiny_model, num_blocks=64, new_detokenizer=Letters)
    seq = inst.add_request(prompts[1], greedy(stop=(stop,)))
    streamed = "".join(t.text for r in run_to_end(inst) for t in r.tokens)
    assert streamed == text[:text.index(stop)]
    assert seq.finish_reason is FinishReason.STOP


@pytest.mark.parametrize("prompt_len,params,message", [
    (0, SamplingParams(), "empty"),
    (600, SamplingParams(), "context"),
    (5, SamplingParams(max_tokens=0), "max_tokens"),
    (5, SamplingParams(max_tokens=-3), "max_tokens"),
    (5, SamplingParams(max_tokens=600), "exceeds"),
    (5, SamplingParams(temperature=-0.1), "temperature"),
    (5, SamplingParams(top_p=0.0), "top_p"),
    (5, SamplingParams(top_p=1.5), "top_p"),
    (5, SamplingParams(stop=("",)), "stop"),
    (100, SamplingParams(max_tokens=400), "KV blocks"),
])
def test_bad_requests_fail_clearly_and_leak_nothing(tiny_model, prompt_len, params, message):
    inst = Instance(tiny_model, num_blocks=16)
    with pytest.raises(RequestError, match=message) as err:
        inst.add_request(random_prompt(prompt_len, 1), params)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ContextLengthError) == (message in ("context", "exceeds"))
    assert inst.kv.num_free_blocks == 16 and not inst.has_work


def test_token_ids_outside_vocabulary_are_refused(tiny_model):
    with pytest.raises(RequestError, match="token ids"):
        Instance(tiny_model, num_blocks=16).add_request([1, 2, 10_000], SamplingParams())


def test_penalized_greedy_picks_the_argmax_of_penalized_logits(tiny_model, prompts, monkeypatch):
    """Penalties need the host: every token of a penalized greedy sequence is the argmax of its
    logits after OpenAI's penalties for the tokens it had output before it."""
    import numpy as np

    from kernels.reference import penalize
    from refengine.engine import instance as instance_module

    seen = []

    def recording_sample(logits, settings, rng, output_ids=()):
        seen.append((np.array(logits), list(output_ids)))
        return real_sample(logits, settings, rng, output_ids)

    real_sample = instance_module.sample
    monkeypatch.setattr(instance_module, "sample", recording_sample)
    inst = Instance(tiny_model, num_blocks=64)
    seq = inst.add_request(prompts[3], greedy(max_tokens=16, frequency_penalty=0.7, presence_penalty=1.1))
    run_to_end(inst)
    assert [before for _, before in seen] == [seq.output_ids[:t] for t in range(16)]
    assert seq.output_ids == [int(np.argmax(penalize(logits, before, 0.7, 1.1) if before else logits))
                              for logits, before in seen]
    assert seq.output_ids != outputs_alone(tiny_model, [prompts[3]], greedy(max_tokens=16))[0]


def test_penalties_out_of_range_are_refused(tiny_model):
    inst = Instance(tiny_model, num_blocks=64)
    for bad in ({"frequency_penalty": 2.5}, {"presence_penalty": -3.0}):
        with pytest.raises(RequestError, match="penalty must be in"):
            inst.add_request([1, 2, 3], greedy(**bad))


def test_logprobs_come_with_the_same_tokens_and_only_when_asked(tiny_model, prompts, expected):
    inst = Instance(tiny_model, num_blocks=64)
    plain, scored = inst.add_request(prompts[2], greedy()), inst.add_request(prompts[2], greedy(logprobs=3))
    outputs = [t for result in run_to_end(inst) for t in result.tokens]
    assert plain.output_ids == scored.output_ids == expected[2]
    assert all(t.logprobs is None for t in outputs if t.seq_id == plain.seq_id)
    mine = [t for t in outputs if t.seq_id == scored.seq_id]
    assert len(mine) == 12
    for t in mine:      # greedy: the token is the likeliest, and the list is sorted
        assert len(t.logprobs.top) == 3 and t.logprobs.top[0] == (t.token_id, t.logprobs.logprob)
        assert t.logprobs.logprob <= 0 and [lp for _, lp in t.logprobs.top] == sorted((lp for _, lp in t.logprobs.top), reverse=True)


def test_logit_bias_steers_the_pick(tiny_model, prompts):
    inst = Instance(tiny_model, num_blocks=64)
    forced = inst.add_request(prompts[1], greedy(max_tokens=6, logit_bias=((7, 100.0),)))
    run_to_end(inst)
    assert forced.output_ids == [7] * 6


@pytest.mark.parametrize("params,message", [(greedy(logit_bias=((10_000, 1.0),)), "logit_bias token ids"),
                                            (greedy(logit_bias=((5, 150.0),)), "logit_bias values"),
                                            (greedy(logprobs=21), "logprobs must be in")])
def test_bad_logprobs_and_bias_are_refused(tiny_model, params, message):
    inst = Instance(tiny_model, num_blocks=16)
    with pytest.raises(RequestError, match=message):
        inst.add_request([1, 2, 3], params)
    assert inst.kv.num_free_blocks == 16 and not inst.has_work
