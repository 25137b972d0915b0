"""Offline generation: a loop around `Instance.step()` for one prompt or a continuous batch of them.

This is the smallest complete use of the engine, and what `python cli.py generate` runs: tokenise,
add every prompt to one instance, step until it drains, and hand each step to the caller (to stream
text, or to print a trace line so a learner can watch the batch form, grow and drain).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from refengine.engine.instance import Instance
from refengine.engine.loader import LoadedModel
from refengine.engine.sequence import SamplingParams
from refengine.engine.step_result import StepResult
from refengine.engine.tokenizer import IncrementalDecoder


@dataclass(frozen=True)
class PromptSpec:
    text: str
    chat: bool = False
    system: str | None = None

    def render(self, loaded: LoadedModel) -> list[int]:
        """Token ids of the prompt; a chat prompt goes through the model's chat template."""
        if not self.chat:
            return loaded.tokenizer.encode(self.text)
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + \
                   [{"role": "user", "content": self.text}]
        return loaded.tokenizer.encode(loaded.tokenizer.apply_chat_template(messages))


@dataclass
class Completion:
    prompt_tokens: int
    text: str = ""
    output_tokens: int = 0
    finish_reason: str | None = None


def generate(loaded: LoadedModel, prompts: list[PromptSpec], params: SamplingParams,
             on_step: Callable[[int, StepResult, list[Completion]], None] | None = None,
             max_prefill_tokens: int = 2048) -> list[Completion]:
    """Run all prompts as one continuous batch; return their completions in prompt order.

    Raises RequestError (one line) before any work if a prompt cannot be served.
    """
    prompt_ids = [p.render(loaded) for p in prompts]
    instance = Instance(loaded.model, num_blocks=1, max_prefill_tokens=max_prefill_tokens,
                        new_detokenizer=partial(IncrementalDecoder, loaded.tokenizer))
    needed = sum(instance.kv.blocks_for(len(ids) + params.max_tokens) for ids in prompt_ids)
    instance.resize_kv(max(needed, 1))
    completions = [Completion(prompt_tokens=len(ids)) for ids in prompt_ids]
    for i, ids in enumerate(prompt_ids):
        instance.add_request(ids, params, seq_id=i)
    step_index = 0
    while (result := instance.step()) is not None:
        for token in result.tokens:
            completions[token.seq_id].text += token.text
            completions[token.seq_id].output_tokens += 1
        for done in result.finished:
            completions[done.seq_id].finish_reason = done.reason.value
        if on_step:
            on_step(step_index, result, completions)
        step_index += 1
    return completions
