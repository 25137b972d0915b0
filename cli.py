"""refengine command line: prepare, generate, bench, simulate, serve.

Each command is a thin wrapper: the work lives in the packages, so the same code is callable from
tests and notebooks. Errors a user can fix become `click.ClickException` (one line, exit status 1).
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from kernels import BACKENDS
from models.catalogue import DEFAULT_MODEL, Catalogue, UnknownModelError
from refengine.store.cache import ModelCacheError
from refengine.bench.commands import bench
from refengine.server.commands import serve
from refengine.sim.commands import simulate
from refengine.store.commands import prepare

USER_ERRORS = (ValueError, UnknownModelError, ModelCacheError)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """refengine: serverless inference of many small LLMs on shared CPUs and GPUs."""


cli.add_command(prepare)
cli.add_command(bench)
cli.add_command(serve)
cli.add_command(simulate)


@cli.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="A catalogue model name.")
@click.option("--prompt", help="The prompt text.")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="One prompt per line, all run as one continuous batch.")
@click.option("--chat", is_flag=True, help="Wrap each prompt as a user message in the model's chat template.")
@click.option("--system", help="System message for --chat.")
@click.option("--max-tokens", default=128, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int, help="0 = no limit.")
@click.option("--frequency-penalty", default=0.0, show_default=True, type=float,
              help="Minus this per earlier occurrence of a token in the output (OpenAI's; -2 to 2).")
@click.option("--presence-penalty", default=0.0, show_default=True, type=float,
              help="Minus this once a token has occurred in the output (OpenAI's; -2 to 2).")
@click.option("--seed", type=int, help="Makes sampling reproducible.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--trace", is_flag=True, help="Print one line per engine step to stderr.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--backend", type=click.Choice(BACKENDS),
              help="Kernel backend (default: the device's own; 'reference' is the numpy ground truth; "
                   "'cpu-bf16-weights' decodes from bf16 copies of the weights, about 2x faster).")
def generate(model: str, prompt: str | None, prompts_file: Path | None, chat: bool, system: str | None,
             max_tokens: int, temperature: float, top_p: float, top_k: int, frequency_penalty: float,
             presence_penalty: float, seed: int | None, stop: tuple[str, ...], trace: bool, device: str,
             backend: str | None) -> None:
    """Generate text for one prompt (streamed) or a batch of prompts, preparing the model if needed."""
    from kernels import backend_for_device, check_device, get_kernels
    from refengine.engine.loader import load_model
    from refengine.engine.sequence import SamplingParams
    from refengine.generate import PromptSpec, generate as run_generate

    if (prompt is None) == (prompts_file is None):
        raise click.UsageError("give exactly one of --prompt and --prompts-file")
    texts = [prompt] if prompt is not None else [l for l in prompts_file.read_text().splitlines() if l.strip()]
    if not texts:
        raise click.UsageError(f"{prompts_file} holds no prompts (one per line)")
    if system and not chat:
        raise click.UsageError("--system needs --chat")
    try:
        check_device(device, backend)        # a CPU backend asked to run on a GPU, too
        spec = Catalogue.default()[model]
        loaded = load_model(spec.weights, get_kernels(backend_for_device(device, backend), device))
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                                seed=seed, stop=stop)
        streaming = len(texts) == 1

        def on_step(index, result, completions):
            if trace:
                click.echo(result.trace_line(index), err=True)
            if streaming:
                sys.stdout.write("".join(t.text for t in result.tokens))
                sys.stdout.flush()
            else:
                for done in result.finished:
                    click.echo(f"[{done.seq_id}] {completions[done.seq_id].text!r} ({done.reason.value})")

        run_generate(loaded, [PromptSpec(t, chat, system) for t in texts], params, on_step)
        if streaming:
            sys.stdout.write("\n")
    except USER_ERRORS as e:
        raise click.ClickException(str(e)) from None


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
