"""GGUF vocabulary -> `tokenizer.json` + `tokenizer_config.json` (HF tokenizers format).

The GGUF carries a GPT-2 byte-level BPE (`tokenizer.ggml.model = gpt2`): its tokens are already in
the byte-to-unicode alphabet and its merges are "left right" strings, so they feed `tokenizers`'s BPE
model unchanged. What the GGUF only names (`tokenizer.ggml.pre = smollm`) is the pre-tokenizer:
llama.cpp's smollm pre-tokenizer splits every digit on its own, then applies the GPT-2 regex.
No BOS/EOS is added (`add_bos_token = false`): chat templates write the markers themselves.
"""
from __future__ import annotations

import json
from pathlib import Path

from gguf import GGUFReader, TokenType
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from refengine.store.convert import field

PRE_TOKENIZERS = {
    "smollm": pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
}


def build_tokenizer(reader: GGUFReader) -> Tokenizer:
    """A byte-level BPE tokenizer with the GGUF's control tokens matched as single special tokens."""
    kind, pre = field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise ValueError(f"unsupported GGUF tokenizer {kind}/{pre}; known: gpt2/{', gpt2/'.join(PRE_TOKENIZERS)}")
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")
    merges = [tuple(m.split(" ")) for m in field(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]
    tokenizer.decoder = decoders.ByteLevel()
    types = field(reader, "tokenizer.ggml.token_type")
    control = [tokens[i] for i, t in enumerate(types) if t == TokenType.CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tokenizer


def tokenizer_config(reader: GGUFReader) -> dict:
    """The HF `tokenizer_config.json` keys the engine reads: special-token strings and the chat template."""
    tokens = field(reader, "tokenizer.ggml.tokens")
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    return {
        "bos_token": tokens[field(reader, "tokenizer.ggml.bos_token_id")],
        "eos_token": tokens[eos],
        "pad_token": tokens[field(reader, "tokenizer.ggml.padding_token_id", eos)],
        "unk_token": tokens[field(reader, "tokenizer.ggml.unknown_token_id")],
        "add_bos_token": field(reader, "tokenizer.ggml.add_bos_token", False),
        "chat_template": field(reader, "tokenizer.chat_template"),
    }


def write_tokenizer_files(reader: GGUFReader, tokenizer_path: Path, config_path: Path) -> None:
    build_tokenizer(reader).save(str(tokenizer_path))
    config_path.write_text(json.dumps(tokenizer_config(reader), indent=1, ensure_ascii=False) + "\n")
