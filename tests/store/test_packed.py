"""The loading-optimized checkpoint of the real SmolLM2: bit-identical to the safetensors, aligned,
in forward order; damage is named in one line, and `prepare` rebuilds it without re-converting."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kernels import get_kernels
from models.config import LlamaConfig
from models.llama import HEAD_PART, final_layout, layer_part
from models.random_weights import TINY, random_tensors
from refengine.engine.loader import ensure_prepared, load_llama
from refengine.store.cache import (
    PREPARE_HINT,
    ModelCacheError,
    ModelFiles,
    is_prepared,
    model_files,
    write_manifest,
)
from refengine.store.packed import ALIGN, is_verified, read_index, write_packed
from refengine.store.prepare import DEFAULT_MODEL, prepare
from tests.store.tiny_packed import write_tiny_model

NAME = DEFAULT_MODEL


@pytest.fixture
def private_copy(prepared_model: ModelFiles, tmp_path: Path) -> ModelFiles:
    """The session's prepared model in a home of its own: converted files hard-linked (never
    modified here), the checkpoint copied so a test may damage it."""
    files = model_files(NAME, tmp_path)
    files.dir.mkdir(parents=True)
    for path in prepared_model.converted:
        (files.dir / path.name).hardlink_to(path)
    for path in (prepared_model.packed, prepared_model.packed_index, prepared_model.manifest):
        shutil.copy2(path, files.dir / path.name)
    return files


def final_arrays(files: ModelFiles) -> dict[str, np.ndarray]:
    """The safetensors weights, stacked as the engine uses them."""
    config = LlamaConfig.from_json(files.config)
    return {name: array for _, name, array in final_layout(load_file(files.weights), config)}


def loaded_arrays(files: ModelFiles) -> dict[str, np.ndarray]:
    w = load_llama(files, get_kernels("reference")).weights
    arrays = {"embed": w.embed, "norm": w.norm}
    for i, layer in enumerate(w.layers):
        arrays |= {f"layers.{i}.{f}": getattr(layer, f) for f in vars(layer)}
    return arrays


def test_round_trip_is_bit_identical(prepared_model: ModelFiles) -> None:
    expected, loaded = final_arrays(prepared_model), loaded_arrays(prepared_model)
    assert loaded.keys() == expected.keys()
    for name, array in expected.items():
        assert loaded[name].dtype == array.dtype and np.array_equal(loaded[name], array), name
    assert is_verified(prepared_model)   # the first load checked the checksums and left the marker


def test_layout_is_aligned_and_in_forward_order(prepared_model: ModelFiles) -> None:
    index = read_index(prepared_model)
    assert index.size % ALIGN == 0 and index.size == prepared_model.packed.stat().st_size
    assert all(e.offset % ALIGN == 0 for e in index.tensors.values())
    assert [p.name for p in index.parts] == [HEAD_PART] + [layer_part(i) for i in range(30)]   # tied: no lm_head
    assert [p.start for p in index.parts[1:]] == [p.end for p in index.parts[:-1]]
    assert index.tensors["layers.0.qkv"].shape == (576 + 2 * 192, 576)
    assert index.tensors["layers.0.gate_up"].shape == (2 * 1536, 576)
    assert len(index.crc32) == len(index.chunks) == -(-index.size // index.chunk_bytes)


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.packed.write_bytes(f.packed.read_bytes()[:-ALIGN]), "tensors.bin has .* bytes, expected"),
    (lambda f: f.packed_index.write_text("{"), "tensor_index.json has 1 bytes, expected"),
    (lambda f: f.packed_index.write_text("{" * f.packed_index.stat().st_size), "tensor_index.json is unreadable"),
])
def test_damage_is_named_and_prepare_rebuilds(private_copy: ModelFiles, prepared_model: ModelFiles, damage,
                                              message: str) -> None:
    damage(private_copy)
    with pytest.raises(ModelCacheError, match=message) as err:
        load_llama(private_copy, get_kernels("reference"))
    assert PREPARE_HINT in str(err.value) and "\n" not in str(err.value)
    assert_rebuilt_without_conversion(private_copy, prepared_model)


def test_corruption_is_named_and_prepare_rebuilds(private_copy: ModelFiles, prepared_model: ModelFiles) -> None:
    with open(private_copy.packed, "r+b") as f:
        f.seek(40_000_000)
        byte = f.read(1)
        f.seek(40_000_000)
        f.write(bytes([byte[0] ^ 0x01]))
    assert is_prepared(NAME, private_copy.dir.parent.parent)    # the cheap check cannot see it
    with pytest.raises(ModelCacheError, match=r"tensors.bin is corrupt \(bytes 33554432-50331648 fail their "
                                              r"checksum\)") as err:
        load_llama(private_copy, get_kernels("reference"))
    assert PREPARE_HINT in str(err.value) and "\n" not in str(err.value)
    assert not is_verified(private_copy)
    assert_rebuilt_without_conversion(private_copy, prepared_model)


def assert_rebuilt_without_conversion(files: ModelFiles, original: ModelFiles) -> None:
    """`prepare` rebuilt the checkpoint as it was (same chunk checksums, which the load checks)
    from the converted files it kept."""
    safetensors_inode = files.weights.stat().st_ino
    prepare(NAME, home=files.dir.parent.parent, progress=False)
    assert files.weights.stat().st_ino == safetensors_inode      # linked, not converted again
    assert read_index(files) == read_index(original)
    load_llama(files, get_kernels("reference"))
    assert is_verified(files)


def test_cache_from_before_the_checkpoint_gets_one(private_copy: ModelFiles, prepared_model: ModelFiles) -> None:
    """An entry prepared by an older version (no checkpoint in the manifest) is upgraded in place."""
    source = json.loads(private_copy.manifest.read_text())["source"]
    private_copy.packed.unlink()
    private_copy.packed_index.unlink()
    manifest = json.loads(private_copy.manifest.read_text())
    manifest["files"] = {p.name: manifest["files"][p.name] for p in private_copy.converted}
    private_copy.manifest.write_text(json.dumps(manifest))
    home = private_copy.dir.parent.parent
    assert not is_prepared(NAME, home)
    assert_rebuilt_without_conversion(private_copy, prepared_model)
    assert is_prepared(NAME, home)
    assert json.loads(private_copy.manifest.read_text())["source"] == source


def test_a_rewritten_file_is_checked_again(tmp_path: Path) -> None:
    files = write_tiny_model(tmp_path, "tiny")
    load_llama(files, get_kernels("reference"))
    assert is_verified(files)
    files.packed.write_bytes(files.packed.read_bytes())       # same bytes, but touched
    assert not is_verified(files)


def test_parts_must_be_contiguous(tmp_path: Path) -> None:
    files = ModelFiles(tmp_path)
    one = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="part 'a' is not contiguous"):
        write_packed(files, [("a", "x", one), ("b", "y", one), ("a", "z", one)])


def test_checkpoint_is_in_the_manifest(tmp_path: Path) -> None:
    files = write_tiny_model(tmp_path, "tiny")
    listed = json.loads(files.manifest.read_text())["files"]
    assert {files.packed.name, files.packed_index.name} <= listed.keys()


def test_entry_written_without_a_checkpoint_is_completed_without_its_gguf(tmp_path: Path) -> None:
    """A cache entry made by hand (safetensors, config, tokenizer files: as tests and older versions
    write them) gets its checkpoint from `prepare`, which needs no GGUF source to do it."""
    config = dataclasses.replace(TINY, tie_word_embeddings=True)
    tensors = random_tensors(config, seed=3)
    files = model_files("hand-made", tmp_path)
    files.dir.mkdir(parents=True)
    save_file(tensors, str(files.weights))
    files.config.write_text(json.dumps(dataclasses.asdict(config)))
    files.tokenizer.write_text("{}")
    files.tokenizer_config.write_text("{}")
    write_manifest(files, source={"test": True})
    assert not is_prepared("hand-made", tmp_path)
    assert ensure_prepared("hand-made", tmp_path) == files
    assert is_prepared("hand-made", tmp_path)
    model = load_llama(files, get_kernels("reference"))
    assert [p.name for p in read_index(files).parts][-1] == layer_part(config.num_hidden_layers - 1)  # tied
    assert np.array_equal(model.weights.embed, tensors["model.embed_tokens.weight"])
