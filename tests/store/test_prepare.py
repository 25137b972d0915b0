"""`prepare` on the real SmolLM2-135M-Instruct GGUF: layout, values, idempotence, repair."""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors import safe_open

from refengine.store.cache import PREPARE_HINT, ModelCacheError, ModelFiles, is_prepared, verify
from refengine.store.commands import prepare as prepare_command
from refengine.store.prepare import DEFAULT_MODEL, SOURCES, prepare

NAME = DEFAULT_MODEL


def home_of(files: ModelFiles) -> Path:
    return files.dir.parent.parent


@pytest.fixture(scope="module")
def gguf_tensors() -> Iterator[dict]:
    """The raw GGUF tensors by GGUF name."""
    with SOURCES[NAME].path() as path:
        yield {t.name: t for t in GGUFReader(path).tensors}


def raw(tensor) -> np.ndarray:
    """Dequantized GGUF tensor in row-major [out, in] shape, rows in GGUF order."""
    return dequantize(tensor.data, tensor.tensor_type).reshape([int(n) for n in reversed(tensor.shape)])


def load(files: ModelFiles, name: str) -> np.ndarray:
    with safe_open(files.weights, framework="np") as f:
        return f.get_tensor(name)


def test_weights_are_hf_llama_float32(prepared_model: ModelFiles) -> None:
    cfg = json.loads(prepared_model.config.read_text())
    H, I, V, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    layer = {"input_layernorm": (H,), "post_attention_layernorm": (H,), "self_attn.q_proj": (q, H),
             "self_attn.k_proj": (kv, H), "self_attn.v_proj": (kv, H), "self_attn.o_proj": (H, q),
             "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}
    expected = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(cfg["num_hidden_layers"]):
        expected |= {f"model.layers.{i}.{k}.weight": shape for k, shape in layer.items()}
    with safe_open(prepared_model.weights, framework="np") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert len(shapes) == 272 and shapes == expected  # tied: no lm_head.weight
    assert dtypes == {"F32"}


def test_config_is_read_from_the_gguf(prepared_model: ModelFiles, golden_dir: Path) -> None:
    cfg = json.loads(prepared_model.config.read_text())
    golden = json.loads((golden_dir / "config.json").read_text())
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "rope_theta", "rms_norm_eps", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id"]
    assert {k: cfg[k] for k in keys} == {k: golden[k] for k in keys}
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"


def test_tokenizer_config(prepared_model: ModelFiles, golden_dir: Path) -> None:
    cfg = json.loads(prepared_model.tokenizer_config.read_text())
    golden = json.loads((golden_dir / "config.json").read_text())
    assert cfg["chat_template"] == golden["chat_template"]
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert cfg["add_bos_token"] is False


@pytest.mark.parametrize("gguf_name, hf_name", [
    ("token_embd.weight", "model.embed_tokens.weight"),  # Q8_0
    ("output_norm.weight", "model.norm.weight"),  # F32
    ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),  # Q4_1
    ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
])
def test_plain_tensors_equal_direct_dequantize(prepared_model, gguf_tensors, gguf_name, hf_name) -> None:
    assert np.array_equal(load(prepared_model, hf_name), raw(gguf_tensors[gguf_name]))


@pytest.mark.parametrize("gguf_name, hf_name, heads", [
    ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 9),
    ("blk.29.attn_k.weight", "model.layers.29.self_attn.k_proj.weight", 3),
])
def test_q_k_rows_are_unpermuted(prepared_model, gguf_tensors, gguf_name, hf_name, heads) -> None:
    """HF row h*64 + s*32 + j holds GGUF row h*64 + 2j + s (golden README), and differs from the raw order."""
    hf, gg = load(prepared_model, hf_name), raw(gguf_tensors[gguf_name])
    h, s, j = np.meshgrid(np.arange(heads), np.arange(2), np.arange(32), indexing="ij")
    assert np.array_equal(hf[(h * 64 + s * 32 + j).ravel()], gg[(h * 64 + 2 * j + s).ravel()])
    assert not np.array_equal(hf, gg)


def test_manifest_records_the_source(prepared_model: ModelFiles, golden_dir: Path) -> None:
    manifest = json.loads(prepared_model.manifest.read_text())
    golden = json.loads((golden_dir / "config.json").read_text())
    assert manifest["source"]["sha256"] == golden["gguf_sha256"]
    assert sorted(manifest["files"]) == sorted(p.name for p in prepared_model.payload)
    verify(prepared_model, deep=True)


def test_rerun_is_a_noop(prepared_model: ModelFiles) -> None:
    """Nothing is rewritten; at most the checkpoint's checksums are checked and their marker left."""
    def written() -> dict:
        return {p: p.stat().st_mtime_ns for p in prepared_model.dir.iterdir() if p != prepared_model.packed_verified}

    before = written()
    start = time.perf_counter()
    assert prepare(home=home_of(prepared_model), progress=False) == prepared_model
    assert time.perf_counter() - start < 0.5
    assert written() == before
    assert prepared_model.packed_verified.exists()


def link_copy(files: ModelFiles, to: Path) -> None:
    """A copy made of hard links: instant, and safe as long as no file is written in place."""
    shutil.copytree(files.dir, to, copy_function=os.link)


def test_damaged_cache_is_rebuilt_and_leftovers_removed(prepared_model: ModelFiles, tmp_path: Path) -> None:
    files = ModelFiles(tmp_path / "models" / NAME)
    link_copy(prepared_model, files.dir)
    files.weights.unlink()
    with open(prepared_model.weights, "rb") as f:
        files.weights.write_bytes(f.read(1000))  # as if cut short
    link_copy(prepared_model, tmp_path / "models" / f".{NAME}.tmp-interrupted")  # as a killed run leaves it
    with pytest.raises(ModelCacheError, match="model.safetensors has 1000 bytes") as err:
        verify(files)
    assert PREPARE_HINT in str(err.value)
    assert not is_prepared(NAME, home=tmp_path)

    assert prepare(home=tmp_path, progress=False) == files
    verify(files, deep=True)
    assert files.manifest.read_text() == prepared_model.manifest.read_text()  # same bytes, same sha256s
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [f".{NAME}.lock", NAME]


def test_staging_dir_alone_is_not_prepared(prepared_model: ModelFiles, tmp_path: Path) -> None:
    link_copy(prepared_model, tmp_path / "models" / f".{NAME}.tmp-interrupted")
    assert not is_prepared(NAME, home=tmp_path)


def test_unknown_name_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"unknown model 'llama-70b'; known: {NAME}$"):
        prepare("llama-70b", home=tmp_path)


def test_command(prepared_model: ModelFiles) -> None:
    env = {"REFENGINE_HOME": str(home_of(prepared_model))}
    ok = CliRunner().invoke(prepare_command, [], env=env)
    assert ok.exit_code == 0 and ok.output.startswith(f"{prepared_model.dir} (") and ok.output.endswith(" s)\n")
    bad = CliRunner().invoke(prepare_command, ["--model", "nope"], env=env)
    assert bad.exit_code == 1 and bad.output == f"Error: unknown model 'nope'; known: {NAME}\n"
