"""The tokenizer against the golden cases (transformers' GGUF tokenizer; llama.cpp agrees on all)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from refengine.engine.tokenizer import IncrementalDecoder, Tokenizer
from refengine.store.cache import ModelFiles


@pytest.fixture(scope="module")
def tokenizer(prepared_model: ModelFiles) -> Tokenizer:
    return Tokenizer(prepared_model)


@pytest.fixture(scope="module")
def cases(golden_dir: Path) -> list[dict]:
    return json.loads((golden_dir / "tokenizer_cases.json").read_text())["cases"]


def test_every_golden_case_encodes_and_decodes(tokenizer: Tokenizer, cases: list[dict]) -> None:
    assert len(cases) == 25
    for case in cases:
        assert tokenizer.encode(case["text"]) == case["ids"], case["text"]
        assert tokenizer.decode(case["ids"]) == case["decoded"], case["text"]


def test_model_facts(tokenizer: Tokenizer, prepared_model: ModelFiles) -> None:
    assert tokenizer.vocab_size == 49152 and tokenizer.eos_token_id == 2
    assert Tokenizer(prepared_model.dir).encode("<|im_end|>") == [2]  # a plain directory works too
    assert tokenizer.encode(" 2024") == [216, 34, 32, 34, 36]


def test_skip_special_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template_renders_the_golden_text(tokenizer: Tokenizer, cases: list[dict]) -> None:
    chats = [c for c in cases if "messages" in c]
    assert len(chats) == 3
    for case in chats:
        assert tokenizer.apply_chat_template(case["messages"], case["add_generation_prompt"]) == case["text"]


@pytest.mark.parametrize("messages", [
    "hello",
    [],
    [{"role": "user"}],
    [{"content": "hi"}],
    [{"role": "user", "content": 42}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    ["user: hi"],
])
def test_malformed_messages_are_rejected(tokenizer: Tokenizer, messages) -> None:
    with pytest.raises(ValueError, match="messages"):
        tokenizer.apply_chat_template(messages)


def test_incremental_decoding_matches_full_decode(tokenizer: Tokenizer, cases: list[dict]) -> None:
    for case in cases:
        decoder = IncrementalDecoder(tokenizer)
        deltas = [decoder.push(i) for i in case["ids"]]
        assert "".join(deltas) + decoder.flush() == case["decoded"], case["text"]
        assert not any("\ufffd" in d for d in deltas), case["text"]


def test_incremental_decoding_holds_back_split_characters(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🤖!")
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids]
    assert len(ids) > 2 and deltas[0] == "" and "🤖" in "".join(deltas)


def test_flush_returns_an_unfinished_character(tokenizer: Tokenizer) -> None:
    first_byte = tokenizer.encode("🤖")[0]  # an incomplete UTF-8 sequence on its own
    decoder = IncrementalDecoder(tokenizer)
    assert decoder.push(first_byte) == ""
    assert decoder.flush() == tokenizer.decode([first_byte]) == "\ufffd"
    assert decoder.push(tokenizer.encode("ok")[0]) == "ok"  # a flushed decoder starts afresh


def test_incremental_skip_special_tokens(tokenizer: Tokenizer) -> None:
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
    ids = tokenizer.encode("hi<|im_end|>")
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "hi"


def test_token_bytes_add_up_to_the_text_even_inside_a_character(tokenizer: Tokenizer, cases: list[dict]) -> None:
    """An emoji spans several byte-level tokens, none of them text alone; their bytes still add up."""
    texts = [c["text"] for c in cases] + ["é😀 naïve\n\t© <|im_end|> 123"]
    for text in texts:
        assert b"".join(tokenizer.token_bytes(i) for i in tokenizer.encode(text)) == text.encode(), text
    assert tokenizer.token_bytes(3575) == b" capital" and tokenizer.token_bytes(2) == b"<|im_end|>"
    parts = [tokenizer.token_bytes(i) for i in tokenizer.encode("😀")]
    assert len(parts) > 1 and all(_not_text(p) for p in parts)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.token_bytes(tokenizer.vocab_size + 5)


def _not_text(part: bytes) -> bool:
    try:
        part.decode()
    except UnicodeDecodeError:
        return True
    return False
