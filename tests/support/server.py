"""A real `lethe serve` process on a free port, for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    process: subprocess.Popen[bytes]
    port: int
    api_key: str
    model: str
    log: Path

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(model: Path, home: Path, log: Path, api_key: str = "test-key", **env: str) -> LiveServer:
    port = free_port()
    environment = {
        **os.environ,
        "LETHE_HOME": str(home),
        "LETHE_API_KEYS": api_key,
        "LETHE_TORCH_THREADS": "2",
        "LETHE_WORKER": "false",  # the unlearning worker child only where a test asks for it
        # The engine in the gateway's process: its own process costs every test a forkserver start
        # and a second model load; tests/engines/test_engine_crash.py asks for it.
        "LETHE_ENGINE_PROCESS": "false",
        **env,
    }
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lethe.gateway.cli.main",
                "serve",
                "--port",
                str(port),
                "--model",
                str(model),
            ],
            env=environment,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return wait_healthy(LiveServer(process, port, api_key, model.name, log), "/healthz", 180, "lethe serve")


def wait_healthy(server: LiveServer, path: str, timeout: float, what: str) -> LiveServer:
    """Poll `path` until it answers 200; stop the server and raise (with its log) if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            log = server.log.read_text()[-3000:]
            raise RuntimeError(f"{what} exited with {server.process.returncode}:\n{log}")
        try:
            if httpx.get(f"{server.root_url}{path}", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"{what} did not become healthy:\n{server.log.read_text()[-3000:]}")
