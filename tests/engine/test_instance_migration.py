"""Live migration at the engine: a sequence exported mid-decode and continued by another instance
goes on with exactly the tokens and text it would have produced where it was (greedy, seeded
sampling, a stop string across the hand-over), whether its KV was rebuilt while it kept decoding
and it was taken over, or it is re-prefilled."""
from __future__ import annotations

import pytest

from refengine.engine.instance import Instance
from refengine.engine.sequence import SamplingParams
from refengine.engine.step_result import StepKind
from tests.conftest import random_prompt

PROMPT = random_prompt(21, seed=3)


class Digits:
    """A detokenizer that spells each token as its number and a space: enough text for stop strings."""

    def push(self, token_id: int) -> str:
        return f"{token_id} "

    def flush(self) -> str:
        return ""


def instance(model) -> Instance:
    return Instance(model, num_blocks=64, new_detokenizer=Digits)


class Client:
    """What the client sees: every token and text delta, from whichever instance runs the sequence."""

    def __init__(self):
        self.tokens: list[int] = []
        self.text = ""
        self.finished = None

    def take(self, result) -> None:
        for token in result.tokens:
            self.tokens.append(token.token_id)
            self.text += token.text
        self.finished = self.finished or next((f.reason for f in result.finished), None)

    def run(self, inst: Instance) -> None:
        while (result := inst.step()) is not None:
            self.take(result)


def unmigrated(model, params) -> Client:
    client = Client()
    inst = instance(model)
    inst.add_request(PROMPT, params)
    client.run(inst)
    return client


def migrated(model, params, after: int, live: bool, meanwhile: int = 3) -> tuple[Client, Instance]:
    """Decode `after` tokens on a source, then move the sequence: `live`, the destination rebuilds
    the KV while the source decodes `meanwhile` more tokens, then takes over; else it re-prefills
    everything."""
    client, source, dest = Client(), instance(model), instance(model)
    seq = source.add_request(PROMPT, params)
    while len(client.tokens) < after:
        client.take(source.step())
    if live:
        dest.prefetch(7, seq.token_ids)                    # the rebuild: everything so far
        rebuild = dest.step()
        assert rebuild.kind is StepKind.PREFILL and rebuild.tokens == () and not dest.has_work
        for _ in range(meanwhile):
            client.take(source.step(StepKind.DECODE))
    state = source.export(seq.seq_id)
    assert source.kv.num_used_blocks == 0 and not source.has_work
    if live:
        caught_up = dest.take_over(7, state)
        assert not dest.waiting and all(seq.num_uncached_tokens == 1 for seq in dest.running)
        if meanwhile:        # the rebuild's newest token and those made meanwhile, in one pass that samples
            assert caught_up.kind is StepKind.PREFILL and caught_up.num_tokens == meanwhile + 1
            assert [t.seq_id for t in caught_up.tokens] == [7]
            client.take(caught_up)
        else:                # nothing to catch up: the next decode feeds the newest token
            assert caught_up is None
    else:
        dest.adopt(7, state)
    client.run(dest)
    return client, dest


CASES = {
    "greedy": SamplingParams(max_tokens=16, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True),
}


@pytest.mark.parametrize("live", [True, False], ids=["live", "re-prefill"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_migrated_sequence_continues_with_identical_tokens(tiny_model, name, live):
    params = CASES[name]
    expected = unmigrated(tiny_model, params)
    got, dest = migrated(tiny_model, params, after=5, live=live)
    assert got.tokens == expected.tokens and len(got.tokens) == 16
    assert got.text == expected.text and got.finished == expected.finished == "length"
    assert dest.kv.num_used_blocks == 0


@pytest.mark.parametrize("meanwhile", [0, 1, 7])
def test_the_hand_over_samples_from_its_catch_up_as_a_decode_would(tiny_model, meanwhile):
    """Whether the source made no token since the rebuild, one or several, the tokens are the same."""
    params = CASES["seeded"]
    expected = unmigrated(tiny_model, params)
    got, dest = migrated(tiny_model, params, after=4, live=True, meanwhile=meanwhile)
    assert got.tokens == expected.tokens and got.text == expected.text
    assert dest.kv.num_used_blocks == 0


def test_a_hand_over_that_makes_the_last_token_finishes_there(tiny_model):
    """max_tokens reached by the catch-up's token: the sequence ends in the take-over, its blocks freed."""
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    expected = unmigrated(tiny_model, params)
    client, source, dest = Client(), instance(tiny_model), instance(tiny_model)
    seq = source.add_request(PROMPT, params)
    while len(client.tokens) < 5:
        client.take(source.step())
    dest.prefetch(7, seq.token_ids)
    dest.step()
    for _ in range(2):
        client.take(source.step(StepKind.DECODE))
    caught_up = dest.take_over(7, source.export(seq.seq_id))
    client.take(caught_up)
    assert [f.seq_id for f in caught_up.finished] == [7] and client.finished == "length"
    assert client.tokens == expected.tokens and len(client.tokens) == 8
    assert not dest.has_work and dest.kv.num_used_blocks == 0


def test_a_stop_string_across_the_hand_over_still_stops_the_text(tiny_model):
    """Tokens 9 and 10 spell the stop string; 9 is made on the source, 10 on the destination: the
    held-back text moves with the sequence, so the client's text ends right before the stop."""
    tokens = unmigrated(tiny_model, CASES["greedy"]).tokens
    stop = f"{tokens[8]} {tokens[9]}"
    params = SamplingParams(max_tokens=16, ignore_eos=True, stop=(stop,))
    expected = unmigrated(tiny_model, params)
    got, _ = migrated(tiny_model, params, after=6, live=True)      # 6 + 3 on the source
    assert expected.finished == got.finished == "stop"
    assert got.text == expected.text and stop not in got.text
    assert got.tokens == expected.tokens


def test_a_catching_up_sequence_is_dropped_with_its_blocks(tiny_model):
    dest = instance(tiny_model)
    dest.prefetch(3, PROMPT)
    dest.step()
    assert dest.kv.num_used_blocks == 2 and dest.export(3) is None
    assert dest.kv.num_used_blocks == 0 and not dest.has_work
