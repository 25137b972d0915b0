"""`python cli.py serve`: the live runtime behind the OpenAI-compatible HTTP API.

Flags become `RuntimeOptions` through small pure functions (sizes and device lists are parsed by
`refengine.runtime.devices`); the app's lifespan starts and stops the runtime around uvicorn.
"""
from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import AsyncIterator, Callable

import click

from kernels import BACKENDS, BackendUnavailable, check_device
from models.catalogue import Catalogue, UnknownModelError
from refengine.runtime.devices import DeviceSpec, parse_devices, parse_size
from refengine.store.prepare import source_for


def build_catalogue(models: str | None, replicas: int) -> Catalogue:
    """The served names: the default catalogue (plus `replicas` names on the default weights), or a
    comma-separated choice among those names, or a catalogue JSON file."""
    if models and (models.endswith(".json") or Path(models).is_file()):
        if replicas:
            raise ValueError("--replicas applies to the default catalogue; list replicas in the catalogue file")
        return Catalogue.from_file(Path(models))
    catalogue = Catalogue.default(replicas=replicas)
    if not models:
        return catalogue
    return Catalogue([catalogue[name.strip()] for name in models.split(",") if name.strip()])


def device_specs(devices: list[str], cpu_memory: int, gpu_memory: int) -> list[DeviceSpec]:
    """Each device with the memory the scheduler may use on it (the flags are per device)."""
    return [DeviceSpec(d, cpu_memory if d.startswith("cpu") else gpu_memory) for d in devices]


def _parsed(parse: Callable) -> Callable:
    """A click callback: a parser's ValueError becomes a usage error naming the option."""
    def callback(ctx: click.Context, param: click.Parameter, value: str):
        try:
            return parse(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return callback


@click.command()
@click.option("--models", help="Comma-separated catalogue names, or a catalogue JSON file (default: all).")
@click.option("--replicas", default=0, show_default=True, type=click.IntRange(min=0),
              help="Extra model names backed by the default weights, as in SLINFER's experiments.")
@click.option("--devices", default="cpu", show_default=True, callback=_parsed(parse_devices),
              help="cpu, cpu*2 (two logical CPU devices), cpu:0,cpu:1, cpu,cuda:0 ...")
@click.option("--cpu-memory", default="8GiB", show_default=True, callback=_parsed(parse_size),
              help="Memory the scheduler may use per CPU device.")
@click.option("--gpu-memory", default="16GiB", show_default=True, callback=_parsed(parse_size),
              help="Memory the scheduler may use per GPU.")
@click.option("--host-cache", default="4GiB", show_default=True, callback=_parsed(parse_size),
              help="Host memory that keeps recently used models for fast cold starts (0: read from disk each time).")
@click.option("--keep-alive", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds an idle instance stays loaded, unless a new instance needs its memory.")
@click.option("--scheduler", default="slinfer", show_default=True, type=click.Choice(["slinfer", "exclusive"]))
@click.option("--backend", type=click.Choice(BACKENDS),
              help="Kernel backend for every device (default: each device's own; 'reference' is numpy; "
                   "'cpu-bf16-weights' decodes from bf16 copies of the weights, about 2x faster).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(models: str | None, replicas: int, devices: list[str], cpu_memory: int, gpu_memory: int,
          host_cache: int, keep_alive: float, scheduler: str, backend: str | None, host: str, port: int, log_level: str) -> None:
    """Serve every catalogue model over an OpenAI-compatible HTTP API (loaded on first use)."""
    from fastapi import FastAPI

    from refengine.runtime.live import LiveRuntime
    from refengine.runtime.options import RuntimeOptions
    from refengine.runtime.setup import ModelTooLarge
    from refengine.server.app import GracefulServer, create_app, runtime_lifespan
    from refengine.store.cache import ModelCacheError

    try:
        catalogue = build_catalogue(models, replicas)
        for weights in sorted(catalogue.weights):   # weights nothing can prepare: refused before any work
            source_for(weights)
    except (ValueError, UnknownModelError) as e:
        raise click.BadParameter(str(e), param_hint="--models") from None
    try:
        for device in devices:
            check_device(device, backend)
    except BackendUnavailable as e:
        raise click.BadParameter(str(e), param_hint="--devices/--backend") from None
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    runtime = LiveRuntime(RuntimeOptions(catalogue=catalogue, devices=device_specs(devices, cpu_memory, gpu_memory),
                                         host_cache_bytes=host_cache, keep_alive_s=keep_alive, scheduler=scheduler,
                                         backend=backend))
    try:
        runtime.prepare()       # weights, tiers and profiles before the server: a bad cache is one line
    except (ModelCacheError, ModelTooLarge) as e:
        raise click.ClickException(str(e)) from None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """The banner goes out once the runtime has prepared and profiled its models."""
        async with runtime_lifespan(runtime)(app):
            # What start-up built (modules, kernels, the models' tables: ~160k objects) lives as long
            # as the server. Frozen, a full collection no longer walks it: on the Zen 3 VM one took
            # 54-62 ms, holding the GIL, so every thread stalled (the first request's TTFT among them).
            gc.collect()
            gc.freeze()
            click.echo(f"refengine: {len(catalogue.names)} models on {','.join(devices)} ({scheduler}, "
                       f"keep-alive {keep_alive:g} s) at http://{host}:{port}/v1")
            yield

    server = GracefulServer(create_app(runtime, lifespan=lifespan), runtime, host=host, port=port,
                            log_level=log_level)
    with suppress(KeyboardInterrupt):   # Ctrl-C is how a server is stopped, not an error
        server.run()
    if not server.started:
        raise click.ClickException("the server did not start (see the log above)")
