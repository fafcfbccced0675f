"""The docs cannot rot: their code runs here.

- every ``python`` block of README.md and docs/*.md runs against a live gateway (the blocks of a
  page in order, sharing one namespace), with the page's placeholders pointed at it: the
  gateway URL, the API key, ``https://example.com/hooks`` (a local receiver);
- a ``python`` block marked ``<!-- excerpt: PATH -->`` is checked to be a part of that tested file;
- ``bash`` blocks marked ``<!-- run -->`` run in a shell against the gateway (the others install
  hookline, which CI does with the README's commands, run benchmarks, or start PostgreSQL
  deployments);
- every ``toml`` block loads as configuration; every ``json`` and ``ini`` block parses;
- the generated references (HTTP API, CLI) are current, and configuration.md names every key;
- the line counts docs/client.md states are the examples' real counts.
"""

from __future__ import annotations

import asyncio
import configparser
import io
import json
import os
import re
import sys
import tokenize
from pathlib import Path

import pytest
from pydantic import BaseModel

from hookline.config import Settings, load_settings
from tests.conftest import LiveGateway
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


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_marked_shell_blocks_run(
    live: LiveGateway, database_url: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "HOOKLINE_URL": live.base_url,
        "HOOKLINE_API_KEY": live.api_key,
        "HOOKLINE_DATABASE_URL": database_url,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "NO_COLOR": "1",
    }
    lines = [json.dumps({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "local", "messages": [{"role": "user", "content": "hi"}]}})]  # fmt: skip
    (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")
    ran = 0
    for page in PAGES:
        for mark, code in blocks(page, "bash"):
            if mark != "run":
                continue
            script = _pointed_at(code, live, "http://127.0.0.1:9/hook").replace(".venv/bin/", "")
            process = await asyncio.create_subprocess_exec(
                "bash", "-euo", "pipefail", "-c", script, cwd=tmp_path, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(process.communicate(), 120)
            assert process.returncode == 0, f"{page.name}:\n{script}\n{out.decode()}{err.decode()}"
            ran += 1
    assert ran >= 4


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
    sections = {"jobs", "worker", "webhooks", "streams", "retention", "batches"}
    missing = []
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if name in sections and isinstance(section, type) and issubclass(section, BaseModel):
            missing += [f"{name}.{k}" for k in section.model_fields if f"`{k}`" not in pages]
        elif name != "upstreams" and f"`{name}`" not in page:
            missing.append(name)
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
