"""Real ``uvicorn serving.app:app`` processes on loopback for the end-to-end, kill and load tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import TINY_ENV

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 240.0  # two workers importing torch on a busy 2-core machine


@dataclass
class ServerProcess:
    """One started server; ``log_file`` is its JSONL diagnostics log."""

    proc: subprocess.Popen[bytes]
    base_url: str
    port: int
    log_file: Path
    output: Path

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        if not self.log_file.is_file():
            return []
        out = []
        for line in self.log_file.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # a line being written right now
                continue
            if name is None or event.get("event") == name:
                out.append(event)
        return out

    def tail(self) -> str:
        return self.output.read_text(errors="replace")[-3000:] if self.output.is_file() else ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(tmp: Path, models_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a tiny-model server: no inherited ``BDI_*``, logs under ``tmp/logs``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BDI_", "BRAKEDISC_"))}
    env.update(TINY_ENV)
    env.update(
        BDI_MODELS_DIR=str(models_dir),
        BDI_GUI_LOG_DIR=str(tmp / "logs"),
        BDI_WEIGHTS_CACHE_DIR=str(tmp / "weights"),
        BDI_REQUIRE_CUDA="0",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), str(REPO / "src"), os.environ.get("PYTHONPATH")])),
    )
    env.update(overrides)
    return env


def start_server(
    tmp: Path, *, models_dir: Path, workers: int = 1, env: Mapping[str, str] | None = None, name: str = "uvicorn"
) -> ServerProcess:
    """Start uvicorn in its own session and wait until ``/health`` answers 200."""
    port = free_port()
    output = tmp / f"{name}.out"
    with output.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "serving.app:app", "--workers", str(workers),
             "--host", "127.0.0.1", "--port", str(port), "--timeout-graceful-shutdown", "10"],
            env=dict(env) if env is not None else server_env(tmp, models_dir), cwd=tmp, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = ServerProcess(proc=proc, base_url=f"http://127.0.0.1:{port}", port=port,
                           log_file=tmp / "logs" / "backend_diagnostics.jsonl", output=output)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}:\n{server.tail()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(f"uvicorn did not answer /health in time:\n{server.tail()}")
        time.sleep(0.2)


def stop_server(server: ServerProcess, *, timeout_s: float = 20.0) -> None:
    """SIGTERM (uvicorn's parent stops its workers), then SIGKILL of our own process group only."""
    proc = server.proc
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session=True: the group is ours alone
        proc.wait(timeout=10)


@contextmanager
def running_server(
    tmp: Path, *, models_dir: Path, workers: int = 1, env: Mapping[str, str] | None = None, name: str = "uvicorn"
) -> Iterator[ServerProcess]:
    server = start_server(tmp, models_dir=models_dir, workers=workers, env=env, name=name)
    try:
        yield server
    finally:
        stop_server(server)
