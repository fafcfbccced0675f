"""Commands from the docs and the examples' docstrings, run as a user runs them: in a terminal of
their own (what one block exports, the next sees), against a real ``hookline serve --dev``.

The only changes made to a command: the gateway runs on a free port instead of 8000 and a
receiver on a free port instead of 3000; ``.venv/bin/`` is this test run's environment (CI's is
the README's ``.venv``); the install commands before ``hookline serve`` are not run again (CI runs
the README's); the docs' placeholder receiver (``https://example.com/hooks``) is a local port
nobody listens on; and the gateway's upstream is the scripted one of the tests instead of the
bundled model (``HOOKLINE_CONFIG``, set for the gateway only). A terminal starts as the
quickstart's second one is left: the environment activated (``.venv/bin`` first on ``PATH``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.scripted_upstream import ScriptedUpstream, Threaded, free_port

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = f"{Path(sys.executable).parent}/"
INSTALL = re.compile(r"^python3 -m venv \.venv && \.venv/bin/pip install [^&]+&& ")
DOCS_PORT = 8000
RECEIVER_PORT = 3000
DEAD_RECEIVER = "http://127.0.0.1:9/hook"  # for the docs' placeholder, https://example.com/hooks


def serve_command(block: str) -> str:
    """The line of ``block`` that starts the gateway, without the install before it or the
    comment after it."""
    [line] = [line for line in block.splitlines() if "hookline serve" in line]
    return INSTALL.sub("", line).split("  #", 1)[0].strip()


def docs_config(path: Path, upstream_url: str) -> Path:
    """The gateway's configuration in these runs: every model goes to the scripted upstream, a
    webhook whose receiver is not up yet is tried again soon. No ``allowed_networks``: a
    webhook reaches localhost only because the docs run ``hookline serve --dev``."""
    path.write_text(
        f"""
local_model = false

[webhooks]
retry_schedule_seconds = [0.3, 0.5, 1, 2, 4]
poll_seconds = 0.2

[[upstreams]]
name = "scripted"
type = "openai"
base_url = "{upstream_url}"
models = ["*"]
"""
    )
    return path


class Terminal:
    """One terminal: commands run in ``cwd`` with bash, each block seeing what the blocks before
    it exported; what a block leaves running in the background is stopped at :meth:`close`."""

    def __init__(self, cwd: Path, env: dict[str, str], gateway_url: str) -> None:
        self.cwd = cwd
        self.gateway_url = gateway_url
        self.state = cwd / f".terminal-{id(self)}.sh"
        self.receiver_port = free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith("HOOKLINE_")}
        self.env = {
            **base, "NO_COLOR": "1", "COLUMNS": "100", "PYTHONDONTWRITEBYTECODE": "1",
            "PATH": f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}", **env,
        }  # fmt: skip
        self._processes: list[subprocess.Popen[bytes]] = []  # each leads a process group
        self._count = 0

    @property
    def _restore(self) -> str:
        """Shell code that brings back what the blocks before exported."""
        state = shlex.quote(str(self.state))
        return f"if [ -f {state} ]; then source {state}; fi"

    def command(self, code: str) -> str:
        """``code`` as it runs here (see the module docstring)."""
        address = self.gateway_url.removeprefix("http://")
        for host in ("localhost", "127.0.0.1"):
            code = code.replace(f"http://{host}:{DOCS_PORT}", self.gateway_url)
            code = code.replace(f"{host}:{DOCS_PORT}", address)
            code = code.replace(f"{host}:{RECEIVER_PORT}", f"{host}:{self.receiver_port}")
        code = code.replace(f"--port {RECEIVER_PORT}", f"--port {self.receiver_port}")
        code = code.replace(f"runserver {RECEIVER_PORT}", f"runserver {self.receiver_port}")
        code = code.replace("https://example.com/hooks", DEAD_RECEIVER)
        return code.replace(".venv/bin/", VENV_BIN)

    def run(self, code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run :meth:`command` of ``code`` to its end (``set -euo pipefail``); what it printed."""
        code = self.command(code)
        self._count += 1
        out, err = self.cwd / f".out-{self._count}", self.cwd / f".err-{self._count}"
        script = (
            f"{self._restore}\nset -euo pipefail\n{code}\n"
            f"export -p > {shlex.quote(str(self.state))}\n"
        )
        with out.open("w") as stdout, err.open("w") as stderr:  # files: a background job
            process = subprocess.Popen(  # keeps them open without holding up the block
                ["bash", "-c", script], cwd=self.cwd, env=self.env, stdout=stdout,
                stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            self._processes.append(process)
            status = process.wait(timeout)
        return subprocess.CompletedProcess(code, status, out.read_text(), err.read_text())

    def start(self, code: str) -> tuple[subprocess.Popen[bytes], Path]:
        """Start :meth:`command` of ``code`` in the background (a server); it and its log."""
        code = self.command(code)
        self._count += 1
        path = self.cwd / f".background-{self._count}.log"
        log = path.open("w")
        process = subprocess.Popen(
            ["bash", "-c", f"{self._restore}\n{code}"], cwd=self.cwd, env=self.env, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        log.close()
        self._processes.append(process)
        return process, path

    def close(self) -> None:
        """Stop what the commands left running: every process of their groups."""
        for process in self._processes:
            _signal_group(process.pid, signal.SIGTERM)
        for process in self._processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(10)
            _signal_group(process.pid, signal.SIGKILL)  # its children that outlived it


def _signal_group(group: int, signal_number: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal_number)


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the gateway exited:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"the gateway is not ready:\n{log.read_text()}")


@contextlib.contextmanager
def gateway_terminal(cwd: Path, serve: str = "hookline serve --dev") -> Iterator[Terminal]:
    """A terminal whose gateway runs ``serve`` (a command from the docs) in the background, as
    the user's first terminal does; it runs in ``cwd`` too, so both use its ``hookline.db``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with Threaded(ScriptedUpstream()) as upstream:
        config = docs_config(cwd / ".gateway.toml", upstream.base_url)
        gateway_env = {"HOOKLINE_CONFIG": str(config), "HOOKLINE_PORT": str(port)}
        gateway = Terminal(cwd, gateway_env, url)
        terminal = Terminal(cwd, {"HOOKLINE_URL": url}, url)
        try:
            if serve.startswith("hookline "):
                serve = ".venv/bin/" + serve
            process, log = gateway.start(serve)
            wait_ready(url, process, log)
            yield terminal
        finally:
            terminal.close()
            gateway.close()
