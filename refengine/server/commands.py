"""`python cli.py serve`: the live runtime behind the OpenAI-compatible HTTP API.

Flag parsing is small pure functions (sizes, device lists, the catalogue), unit-tested without a
server; the command wires them into `RuntimeOptions`, starts and stops the runtime in the app's
lifespan, and runs uvicorn.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import click

from models.catalogue import Catalogue, UnknownModelError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?(?:\*(\d+))?$")


def parse_size(text: str) -> int:
    """Bytes from `8GiB`, `512MiB`, `1.5GB`, `1000000` (plain numbers are bytes; units are explicit
    about binary vs decimal, so a bare `8G` is refused rather than guessed)."""
    match = _SIZE.match(text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise ValueError(f"cannot read size {text!r}; write e.g. 8GiB, 512MiB, 2GB or a number of bytes")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


def parse_devices(text: str) -> list[str]:
    """Device names from `cpu`, `cpu*2` (two CPU devices, each with its own worker: cpu:0, cpu:1),
    `cpu:0,cpu:1`, `cpu,cuda:0`; a bare `cuda` is cuda:0."""
    devices: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        match = _DEVICE.match(item)
        if not match:
            raise ValueError(f"cannot read device {item!r}; write cpu, cpu:N, cpu*K, cuda:N or cuda*K")
        kind, index, count = match.groups()
        if count is not None:
            if index is not None or int(count) < 1:
                raise ValueError(f"{item!r}: write {kind}*K with K >= 1 and no index")
            devices += [f"{kind}:{i}" for i in range(int(count))]
        else:
            devices.append(f"{kind}:{index or 0}" if kind == "cuda" or index is not None else kind)
    duplicates = sorted({d for d in devices if devices.count(d) > 1})
    if duplicates:
        raise ValueError(f"device {', '.join(duplicates)} is listed twice")
    return devices


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


def device_memory(devices: list[str], cpu_memory: int | None, gpu_memory: int | None) -> dict[str, int]:
    """Each device's capacity for the scheduler; devices left out get the runtime's default."""
    per_kind = {"cpu": cpu_memory, "cuda": gpu_memory}
    return {d: size for d in devices if (size := per_kind[d.split(":")[0]]) is not None}


def _parsed(parse: Callable) -> Callable:
    """A click callback: a parser's ValueError becomes a usage error naming the option."""
    def callback(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return None
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
              help="cpu, cpu*2, cpu:0,cpu:1, cpu,cuda:0 ...")
@click.option("--cpu-memory", callback=_parsed(parse_size), help="Memory per CPU device, e.g. 8GiB.")
@click.option("--gpu-memory", callback=_parsed(parse_size), help="Memory per GPU, e.g. 40GiB.")
@click.option("--keep-alive", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds an idle instance stays loaded.")
@click.option("--scheduler", default="slinfer", show_default=True, type=click.Choice(["slinfer", "exclusive"]))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(models: str | None, replicas: int, devices: list[str], cpu_memory: int | None, gpu_memory: int | None,
          keep_alive: float, scheduler: str, host: str, port: int, log_level: str) -> None:
    """Serve every catalogue model over an OpenAI-compatible HTTP API (loaded on first use)."""
    import uvicorn

    from refengine.runtime.live import LiveRuntime, RuntimeOptions
    from refengine.server.app import create_app, runtime_lifespan

    try:
        catalogue = build_catalogue(models, replicas)
    except (ValueError, UnknownModelError) as e:
        raise click.BadParameter(str(e), param_hint="--models") from None
    runtime = LiveRuntime(RuntimeOptions(catalogue=catalogue, devices=devices,
                                         memory=device_memory(devices, cpu_memory, gpu_memory),
                                         keep_alive_s=keep_alive, scheduler=scheduler))
    app = create_app(runtime, lifespan=runtime_lifespan(runtime))
    click.echo(f"refengine: {len(catalogue.names)} models on {','.join(devices)} ({scheduler}, keep-alive "
               f"{keep_alive:g} s) at http://{host}:{port}/v1")
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
