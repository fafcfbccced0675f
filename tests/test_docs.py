"""The docs cannot rot: their code runs here.

- every ``python`` block of README.md and docs/*.md runs against a live gateway (the blocks of a
  page in order, sharing one namespace), with the page's placeholders pointed at it: the
  gateway URL, the API key, ``https://example.com/hooks`` (a local receiver);
- a ``python`` block marked ``<!-- excerpt: PATH -->`` is checked to be a part of that tested file;
- the ``bash`` blocks marked ``<!-- run -->`` of a page run in order, in one terminal, against the
  ``hookline serve`` its ``<!-- serve -->`` block starts (the README's by default), and print what
  the page says they do (see tests/shell.py); every other shell block names what runs it
  (``<!-- run elsewhere: scripts/bench -->``), and the README's test command is CI's;
- every ``toml`` block loads as configuration; every ``json`` and ``ini`` block parses;
- the generated references (HTTP API, CLI) are current, and configuration.md names every key;
- the line counts docs/client.md states are the examples' real counts.
"""

from __future__ import annotations

import asyncio
import configparser
import gc
import inspect
import io
import json
import re
import sys
import tokenize
from pathlib import Path

import pytest
from pydantic import BaseModel

from hookline.config import Settings, SinkConfig, load_settings
from tests.conftest import LiveGateway
from tests.shell import gateway_terminal, serve_command
from tests.webhook_receiver import WebhookReceiver

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
_BLOCK = re.compile(
    r"(?:<!--\s*(?P<mark>[^>]*?)\s*-->\s*\n)?```(?P<lang>\w*)[^\n]*\n(?P<code>.*?)```", re.S
)


def blocks(page: Path, lang: str) -> list[tuple[str, str]]:
    """(marker, code) of the page's blocks in ``lang``."""
    return [
        (m.group("mark") or "", m.group("code"))
        for m in _BLOCK.finditer(page.read_text())
        if m.group("lang") == lang
    ]


def _pages_with(lang: str) -> list[Path]:
    return [page for page in PAGES if blocks(page, lang)]


def _pointed_at(code: str, live: LiveGateway, hook_url: str) -> str:
    for placeholder in ("http://127.0.0.1:8000", "http://localhost:8000"):
        code = code.replace(placeholder, live.base_url)
    address = live.base_url.removeprefix("http://")
    code = code.replace("localhost:8000", address).replace("127.0.0.1:8000", address)
    return code.replace("https://example.com/hooks", hook_url).replace(
        '"hk_..."', repr(live.api_key)
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("page", _pages_with("python"), ids=lambda p: str(p.relative_to(ROOT)))
async def test_python_blocks_run(
    page: Path,
    live: LiveGateway,
    receiver: WebhookReceiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOOKLINE_URL", live.base_url)
    monkeypatch.setenv("HOOKLINE_API_KEY", live.api_key)
    monkeypatch.chdir(tmp_path)
    lines = [json.dumps({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "local", "messages": [{"role": "user", "content": "hi"}]}})]  # fmt: skip
    (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")
    namespace: dict[str, object] = {"HOOKLINE_API_KEY": live.api_key, "__name__": "__docs__"}
    for mark, code in blocks(page, "python"):
        if mark.startswith("excerpt:"):
            source = (ROOT / mark.removeprefix("excerpt:").strip()).read_text()
            missing = [
                line for line in code.splitlines()
                if line.strip() and line.strip() != "..." and line.strip() not in source
            ]  # fmt: skip
            assert not missing, f"{page.name}: not in {mark}: {missing}"
            continue
        compiled = compile(_pointed_at(code, live, receiver.url()), str(page), "exec")
        await asyncio.to_thread(exec, compiled, namespace)
    _close_clients(namespace)


def _close_clients(namespace: dict[str, object]) -> None:
    """Close the HTTP clients the page's blocks left open (a script's end would), then collect:
    a socket left unclosed is reported here, not by whichever test the collector next runs in."""
    for value in namespace.values():
        module = type(value).__module__.split(".")[0]
        close = getattr(value, "close", None)
        ours = module in ("httpx", "openai", "anthropic", "hookline")
        if ours and callable(close) and not inspect.iscoroutinefunction(close):
            close()
    gc.collect()


# What each page's shell blocks must print: proof they did what the page says they do.
SHELL_OUTPUT = {
    "README.md": ["echo: Write a haiku about queues.", '"status":"queued"'],
    "docs/quickstart.md": [
        "echo: Write a haiku about queues.",
        "echo: Count to five.",  # streamed
        "verified job.succeeded of job_",  # the receiver got a signed webhook on localhost
        "job.succeeded → http://localhost:",  # the submit saw it delivered
        "delivered (200)",
        "laptop",  # the key's name in the list
        "revoked key_",
        "401",  # and then it is refused
    ],
    "docs/batches.md": ["completed: 1 completed, 0 failed of 1"],
    "docs/streams.md": ["event: job.succeeded"],
}


def _run_pages() -> list[Path]:
    return [page for page in PAGES if any(mark == "run" for mark, _ in blocks(page, "bash"))]


@pytest.mark.parametrize("page", _run_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_blocks_run_as_written(page: Path, tmp_path: Path) -> None:
    # The page's blocks, in order, in one terminal, against the gateway its serve block starts
    # (a page without one: the README's), in a folder like the checkout (see tests/shell.py).
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    lines = [json.dumps({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "local", "messages": [{"role": "user", "content": "hi"}]}})]  # fmt: skip
    (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")
    serving = [code for mark, code in blocks(page, "bash") if mark == "serve"]
    serve = serve_command((serving or [_readme_serve_block()])[0])
    printed = []
    with gateway_terminal(tmp_path, serve) as terminal:
        runs = [code for mark, code in blocks(page, "bash") if mark == "run"]
        if not any("keys create" in code for code in runs):  # as the quickstart left it
            terminal.run("export HOOKLINE_API_KEY=$(.venv/bin/hookline keys create --tenant demo)")
        for code in runs:
            ran = terminal.run(code)
            assert ran.returncode == 0, f"{page.name}:\n{code}\n{ran.stdout}{ran.stderr}"
            printed.append(ran.stdout + ran.stderr)
    name = str(page.relative_to(ROOT))
    for expected in SHELL_OUTPUT[name]:
        assert expected in "".join(printed), f"{name} did not print {expected!r}:\n{printed}"


def _readme_serve_block() -> str:
    [block] = [code for mark, code in blocks(ROOT / "README.md", "bash") if mark == "serve"]
    return block


def test_every_shell_block_is_run_or_names_what_runs_it() -> None:
    for page in PAGES:
        for mark, code in blocks(page, "bash"):
            if mark in ("run", "serve"):
                continue
            where = mark.removeprefix("run elsewhere:").strip()
            assert where != mark, (
                f"{page.name}: mark this block <!-- run --> or say what runs it:\n{code}"
            )
            path, _, test = where.partition("::")
            assert (ROOT / path).exists(), f"{page.name}: {path} does not exist"
            if test:
                assert f"def {test}(" in (ROOT / path).read_text(), f"{page.name}: no {where}"


def test_the_readme_commands_are_what_ci_runs() -> None:
    block = _readme_serve_block()
    install_and_run, install_and_test = (
        line.split("  #")[0].strip() for line in block.splitlines()
    )
    assert serve_command(block) == ".venv/bin/hookline serve --dev"
    assert install_and_run.startswith(
        "python3 -m venv .venv && .venv/bin/pip install -e '.[local]'"
    )
    ci = [
        line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "scripts/test" in line
    ]
    assert [line.replace(" -q", "") for line in ci] == [install_and_test]


@pytest.mark.parametrize("page", _pages_with("ini"), ids=lambda p: str(p.relative_to(ROOT)))
def test_ini_blocks_parse(page: Path) -> None:
    for _, code in blocks(page, "ini"):  # systemd units
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string(code)
        assert parser.has_section("Service")


@pytest.mark.parametrize("page", _pages_with("toml"), ids=lambda p: str(p.relative_to(ROOT)))
def test_toml_blocks_are_valid_configuration(page: Path, tmp_path: Path) -> None:
    for _, code in blocks(page, "toml"):
        path = tmp_path / "config.toml"
        path.write_text(code)
        load_settings(path)


@pytest.mark.parametrize("page", _pages_with("json"), ids=lambda p: str(p.relative_to(ROOT)))
def test_json_blocks_parse(page: Path) -> None:
    for _, code in blocks(page, "json"):
        json.loads(code)


def test_generated_references_are_current(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import reference  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    stale = "stale: run `.venv/bin/python scripts/reference.py`"
    assert reference.http_api() == reference.HTTP_PAGE.read_text(), stale
    assert reference.cli() == reference.CLI_PAGE.read_text(), stale


def test_the_configuration_page_names_every_key() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    pages = (
        page
        + (ROOT / "docs" / "webhooks.md").read_text()
        + (ROOT / "docs" / "batches.md").read_text()
    )
    sections = {"jobs", "worker", "webhooks", "streams", "retention", "batches", "http", "metrics",
                "tracing", "dashboard"}  # fmt: skip
    missing = []
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if name in sections and isinstance(section, type) and issubclass(section, BaseModel):
            missing += [f"{name}.{k}" for k in section.model_fields if f"`{k}`" not in pages]
        elif name != "upstreams" and f"`{name}`" not in page:
            missing.append(name)
    sinks_page = (ROOT / "docs" / "sinks.md").read_text()
    missing += [f"sinks.{k}" for k in SinkConfig.model_fields if f"`{k}`" not in sinks_page]
    assert not missing, f"docs/configuration.md lacks {missing}"


def code_lines(path: Path) -> int:
    """Lines holding code: no blank lines, comments or docstrings."""
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER}  # fmt: skip
    lines: set[int] = set()
    for i, token in enumerate(tokens):
        if token.type in skip:
            continue
        if token.type == tokenize.STRING:
            before = [t for t in tokens[:i] if t.type not in (tokenize.NL, tokenize.COMMENT)]
            statement_start = not before or before[-1].type in (
                tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            )  # fmt: skip
            if statement_start and tokens[i + 1].type == tokenize.NEWLINE:
                continue  # a docstring
        lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines)


def test_the_line_counts_in_the_docs_are_true() -> None:
    page = (ROOT / "docs" / "client.md").read_text()
    submit = code_lines(ROOT / "examples" / "submit_and_webhook.py")
    receive = code_lines(ROOT / "examples" / "receiver_flask.py")
    by_hand = code_lines(ROOT / "examples" / "by_hand_polling.py")
    assert f"submit_and_webhook.py`, {submit} lines" in page
    assert f"receiver_flask.py`, {receive} lines), {submit + receive} in all" in page
    assert f"by_hand_polling.py`) takes {by_hand} lines" in page


def test_every_page_is_linked() -> None:
    linked = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in PAGES)
    orphans = [p.name for p in PAGES[1:] if p.name not in linked.replace(p.read_text(), "")]
    assert not orphans, f"pages no other page links to: {orphans}"
