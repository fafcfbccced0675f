"""What the commands share: their common options (each with its ``HOOKLINE_*`` twin), where they
print, and how they fail."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from hookline.config import Settings, load_settings
from hookline.errors import HooklineError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)  # an error is one line

DEFAULT_URL = "http://127.0.0.1:8000"

# --- server commands: each fills one Settings field (docs/configuration.md)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", envvar="HOOKLINE_CONFIG", metavar="FILE",
        help="A TOML configuration file (docs/configuration.md).",
    ),
]  # fmt: skip
DatabaseOpt = Annotated[
    str | None,
    typer.Option(
        "--database-url", envvar="HOOKLINE_DATABASE_URL", metavar="URL",
        help="sqlite:///file.db or postgresql://user@host/db  [default: sqlite:///hookline.db]",
    ),
]  # fmt: skip
HostOpt = Annotated[
    str | None,
    typer.Option(
        "--host", envvar="HOOKLINE_HOST", metavar="ADDRESS",
        help="The address to listen on.  [default: 127.0.0.1]",
    ),
]  # fmt: skip
PortOpt = Annotated[
    int | None,
    typer.Option(
        "--port", envvar="HOOKLINE_PORT", metavar="PORT",
        help="The TCP port to listen on.  [default: 8000]",
    ),
]  # fmt: skip
LogOpt = Annotated[
    str | None,
    typer.Option(
        "--log-level", envvar="HOOKLINE_LOG_LEVEL", metavar="LEVEL",
        help="debug, info, warning or error.  [default: info]",
    ),
]  # fmt: skip
MigrateOpt = Annotated[
    bool,
    typer.Option(
        "--migrate/--no-migrate", envvar="HOOKLINE_MIGRATE",
        help="Bring the database schema up to date at start (off: run `hookline migrate` once "
        "per release).",
    ),
]  # fmt: skip

# --- client commands: they call the gateway's HTTP API

UrlOpt = Annotated[
    str,
    typer.Option("--url", envvar="HOOKLINE_URL", metavar="URL", help="The gateway's base URL."),
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="HOOKLINE_API_KEY", metavar="KEY",
        help="Your API key (`hookline keys create` makes one).",
    ),
]  # fmt: skip
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text, for scripts.")]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code`` (2: the command was wrong)."""
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def settings(config: Path | None, **overrides: Any) -> Settings:
    """The settings from the file and the flags (``None``: not given); exit 2 if invalid."""
    try:
        return load_settings(config, **overrides)
    except HooklineError as exc:
        fail(str(exc), 2)


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout."""
    print(json.dumps(value, indent=2))


def print_columns(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Rows aligned under their headers, never cut: a line wider than the terminal wraps, so
    every id can be copied whole."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    for line in (headers, *rows):
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print("  ".join(cells).rstrip())
