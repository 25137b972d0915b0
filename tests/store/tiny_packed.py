"""A tiny random model written as a prepared cache entry (packed checkpoint, manifest, stand-in
tokenizer files): what the store reads, in milliseconds, for tests that need many models."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from models.config import LlamaConfig
from models.llama import final_layout
from models.random_weights import TINY, random_tensors
from refengine.store.cache import ModelFiles, model_files, write_manifest
from refengine.store.packed import write_packed


def write_tiny_model(home: Path, name: str, seed: int = 0, config: LlamaConfig = TINY,
                     chunk_bytes: int = 16 << 10) -> ModelFiles:
    """Small chunks (16 KiB), so even a tiny model is read in several pieces."""
    files = model_files(name, home)
    files.dir.mkdir(parents=True)
    files.config.write_text(json.dumps(dataclasses.asdict(config)))
    for path in (files.weights, files.tokenizer, files.tokenizer_config):
        path.write_text("{}")    # the store never reads them; the manifest only wants them there
    write_packed(files, final_layout(random_tensors(config, seed), config), chunk_bytes=chunk_bytes)
    write_manifest(files, source={"test": name})
    return files
