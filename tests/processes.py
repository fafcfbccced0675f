"""Real hookline processes for end-to-end tests: started on a free loopback port, always stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.scripted_upstream import free_port


def write_config(
    path: Path,
    upstream_url: str,
    *,
    max_concurrency: int = 4,
    lease_seconds: float = 30,
    webhook_timeout_seconds: float = 15,
    delta_flush_seconds: float = 0.25,
    allowed_networks: tuple[str, ...] = ("127.0.0.0/8",),
) -> Path:
    """A configuration for tests: the scripted upstream serves every model; webhooks may go to
    ``allowed_networks`` (none: only what ``--dev`` allows)."""
    path.write_text(
        f"""
local_model = false

[jobs]
retry_base_seconds = 0.05

[worker]
poll_seconds = 0.2
drain_seconds = 1.0
lease_seconds = {lease_seconds}
heartbeat_seconds = {min(5.0, lease_seconds / 3)}
delta_flush_seconds = {delta_flush_seconds}

[webhooks]
allowed_networks = {json.dumps(list(allowed_networks))}
poll_seconds = 0.2
timeout_seconds = {webhook_timeout_seconds}

[[upstreams]]
name = "scripted"
type = "openai"
base_url = "{upstream_url}"
models = ["*"]
max_concurrency = {max_concurrency}
"""
    )
    return path


def hookline(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the ``hookline`` CLI to completion."""
    return subprocess.run(
        [sys.executable, "-m", "hookline", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})},
        cwd=cwd,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class GatewayProcess:
    def __init__(
        self, command: str, env: dict[str, str], cwd: Path, args: tuple[str, ...] = ()
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            **env,
            "HOOKLINE_PORT": str(self.port),
            "HOOKLINE_HOST": "127.0.0.1",
        }
        self.command = command
        self.args = args
        self.cwd = cwd
        self.log = cwd / f"{command}-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> GatewayProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "hookline", self.command, *self.args],
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if self.command != "worker":
            self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"hookline {self.command} exited:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"hookline {self.command} not ready:\n{self.log.read_text()}")

    def terminate(self, timeout: float = 30) -> None:
        """SIGTERM, wait for the drain, and check the process shut down cleanly."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        # uvicorn re-raises the SIGTERM it handled once shutdown is complete.
        assert code in (0, -signal.SIGTERM), f"exit {code}:\n{self.log.read_text()}"
        if self.command != "worker":
            assert "Application shutdown complete" in self.log.read_text()

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to clean up."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
