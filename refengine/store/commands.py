"""`python cli.py prepare`: build a model's cache entry from its shipped GGUF."""
from __future__ import annotations

import time

import click

from refengine.store.cache import ModelCacheError
from refengine.store.prepare import DEFAULT_MODEL
from refengine.store.prepare import prepare as prepare_model


@click.command()
@click.option("--model", "name", default=DEFAULT_MODEL, show_default=True, help="weights to prepare")
@click.option("--force", is_flag=True, help="rebuild even if the cache entry verifies")
def prepare(name: str, force: bool) -> None:
    """Convert a shipped GGUF into float32 safetensors, a loading-optimized checkpoint and a tokenizer in the
    model cache ($REFENGINE_HOME); rebuild a checkpoint that is missing or fails its checksums."""
    start = time.perf_counter()
    try:
        files = prepare_model(name, force=force, progress=True)
    except (ValueError, ModelCacheError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{files.dir} ({time.perf_counter() - start:.1f} s)")
