"""One `python cli.py serve` per benchmark point, in a process of its own.

A subprocess rather than uvicorn in a thread of the benchmark: its peak resident memory (`VmHWM`)
is the server's alone, the replay client does not compete with the server's event loop for one GIL
on a 2-core machine, and every point starts from nothing loaded with every counter at zero.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

CLI = Path(__file__).resolve().parents[2] / "cli.py"
WARMUP_PROMPT = 64       # the CPU kernels' bf16 (AMX) threshold, so every GEMM path is compiled before the trace


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`cli.py serve` with `args` on a free loopback port, up (healthy) inside the `with` block."""

    def __init__(self, args: list[str], log: Path, home: Path | None = None, start_timeout_s: float = 600.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, str(CLI), "serve", *args, "--host", "127.0.0.1", "--port",
                        str(self.port), "--log-level", "warning"]
        self.env = {**os.environ, **({"REFENGINE_HOME": str(home)} if home else {})}
        self.log = log
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not up after {self.start_timeout_s:.0f} s:\n{self.log_tail()}")

    def warm_up(self, model: str, unload_timeout_s: float = 60.0) -> None:
        """One request (loads the kernels' machine code and touches every GEMM path), then wait until
        the keep-alive has unloaded it again, so the measured run starts from zero instances."""
        httpx.post(f"{self.url}/v1/completions", timeout=unload_timeout_s, json={
            "model": model, "prompt": [100] * WARMUP_PROMPT, "max_tokens": 2, "ignore_eos": True}).raise_for_status()
        deadline = time.monotonic() + unload_timeout_s
        while httpx.get(f"{self.url}/health", timeout=10).json()["loaded"]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the warm-up instance was still loaded after {unload_timeout_s:.0f} s")
            time.sleep(0.2)

    def peak_rss_bytes(self) -> int | None:
        """The process's peak resident set so far (Linux `VmHWM`); None where /proc has no such line."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ctrl-C (uvicorn drains and the runtime stops its workers), then a kill if that hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
