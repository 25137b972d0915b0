"""`python cli.py generate` end to end on the real model, and the CLI's one-line errors."""
from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from cli import cli


@pytest.fixture
def home(model_home, monkeypatch):
    monkeypatch.setenv("REFENGINE_HOME", str(model_home))
    return model_home


@pytest.mark.parametrize("backend", [[], ["--backend", "cpu-bf16-weights"]], ids=["default", "bf16-weights"])
def test_generate_streams_the_golden_greedy_text(home, prepared_model, golden_dir, backend):
    from refengine.engine.tokenizer import Tokenizer
    case = next(c for c in json.loads((golden_dir / "greedy.json").read_text())["cases"] if c["kind"] == "raw")
    result = CliRunner().invoke(cli, ["generate", "--prompt", case["prompt_text"], "--max-tokens", "8", *backend])
    assert result.exit_code == 0, result.output
    assert result.output == Tokenizer(prepared_model).decode(case["completion_ids"][:8]) + "\n"


def test_generate_runs_a_prompts_file_as_one_batch(home, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n\nOne, two, three,\n")
    result = CliRunner().invoke(cli, ["generate", "--prompts-file", str(prompts), "--max-tokens", "4"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and all(line.endswith("(length)") for line in lines)


@pytest.mark.parametrize("args,complaint", [
    (["generate"], "give exactly one of --prompt and --prompts-file"),
    (["generate", "--prompt", "hi", "--system", "be brief"], "--system needs --chat"),
    (["generate", "--prompt", "hi", "--device", "cpu", "--backend", "cuda"], "not 'cpu'"),
    (["bench", "decode", "--device", "tpu"], "unknown device 'tpu'"),
    (["bench", "load", "--device", "cuda:0"], "cuda:0 needs CuPy"),
    (["bench", "prefill", "--backend", "cuda"], "the cuda backend runs on cuda or cuda:N"),
    (["bench", "migrate", "--backend", "cuda"], "the cuda backend runs on cuda or cuda:N"),
    (["generate", "--prompt", "hi", "--device", "cuda", "--backend", "cpu-bf16-weights"], "runs on cpu or cpu:N"),
])
def test_bad_flags_are_one_line(args, complaint, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code in (1, 2) and complaint in result.output
    assert isinstance(result.exception, SystemExit)     # a click error, not an exception escaping


def test_an_empty_prompts_file_says_so(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    result = CliRunner().invoke(cli, ["generate", "--prompts-file", str(empty)])
    assert result.exit_code == 2 and "holds no prompts" in result.output


@pytest.mark.parametrize("args,complaint", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--max-tokens", "0"], "max_tokens must be a positive integer"),
    (["--temperature", "-1"], "temperature must be >= 0"),
])
def test_bad_generation_settings_are_one_line(home, args, complaint):
    result = CliRunner().invoke(cli, ["generate", "--prompt", "hi", *args])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {complaint}")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args,complaint", [
    (["decode", "--prompt-len", "0"], "0 is not in the range x>=1"),
    (["decode", "--new-tokens", "-3"], "-3 is not in the range x>=1"),
    (["coldstart", "--repeats", "0"], "0 is not in the range x>=1"),
    (["decode", "--prompt-len", "8000", "--new-tokens", "200"], "needs 8200 tokens in one sequence; the model's context is 8192"),
    (["prefill", "--length", "128", "--length", "9000"], "needs 9001 tokens in one sequence"),
    (["decode", "--peers", "--context", "8192"], "--context: needs 8209 tokens"),
    (["coldstart", "--prompt-len", "8192"], "--prompt-len: needs 8193 tokens"),
    (["migrate", "--context", "8000"], "--context: needs 8256 tokens"),
])
def test_bench_sizes_beyond_the_model_are_one_line(home, args, complaint):
    result = CliRunner().invoke(cli, ["bench", *args, "--no-write"])
    assert result.exit_code == 2 and complaint in result.output, result.output
    assert isinstance(result.exception, SystemExit)
