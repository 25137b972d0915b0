"""refengine command line: prepare, generate, bench, simulate, serve.

Each command is a thin wrapper: the work lives in the packages, so the same code is callable from
tests and notebooks. Errors a user can fix are raised as `click.ClickException` (one line, exit 1).
"""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """refengine: serverless inference of many small LLMs on shared CPUs and GPUs."""


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
