"""Real warmtune processes for integration tests: `warmtune serve` (and workers) on free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from conftest import FAST


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fast_env(home: Path, **overrides: str) -> dict[str, str]:
    """Environment for a warmtune process with the tests' small, fast configuration."""
    env = {f"WARMTUNE_{k.upper()}": str(v) for k, v in FAST.items()}
    env |= {"WARMTUNE_HOME": str(home), "WARMTUNE_POLL_INTERVAL_S": "0.5", "WARMTUNE_LOG_EVERY": "1000"}
    return {**os.environ, **env, **overrides}


@dataclass
class Process:
    proc: subprocess.Popen
    log: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text()


def start(args: list[str], env: dict[str, str], log: Path) -> Process:
    out = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    return Process(proc, log)


@dataclass
class Server(Process):
    url: str

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)


def start_server(env: dict[str, str], log: Path, port: int | None = None) -> Server:
    port = port or free_port()
    process = start(["serve", "--port", str(port)], env, log)
    server = Server(process.proc, log, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{server.output()}")
        try:
            if httpx.get(server.url + "/healthz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"server did not start:\n{server.output()}")


def upload(images: list[bytes], labels: list[str] | None = None) -> dict:
    """httpx keyword arguments for a multipart body of images (and labels)."""
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return {"files": files, "data": {"labels": labels} if labels is not None else {}}


def wait_for_update(client: httpx.Client, update_id: str, timeout: float = 300) -> dict:
    """Poll GET /updates/{id} until the update set is applied, rejected or failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/updates/{update_id}").json()
        if status["status"] not in ("queued", "running"):
            return status
        time.sleep(0.2)
    raise TimeoutError(f"update {update_id} still {status['status']} after {timeout}s")


def wait_until_served(client: httpx.Client, version: int, timeout: float = 10) -> float:
    """Poll /readyz until the replica serves the version; returns the seconds it took."""
    start_at = time.monotonic()
    while time.monotonic() - start_at < timeout:
        if client.get("/readyz").json().get("model_version") == version:
            return time.monotonic() - start_at
        time.sleep(0.05)
    raise TimeoutError(f"{client.base_url} does not serve version {version} after {timeout}s")
