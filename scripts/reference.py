"""Write the generated reference pages: docs/reference/http-api.md (from the OpenAPI spec) and
docs/reference/cli.md (from the CLI's own help). tests/test_docs.py fails when they are stale.

    .venv/bin/python scripts/reference.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from typer._click.core import Command, Context
from typer.core import TyperArgument

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from hookline.api import create_app  # noqa: E402
from hookline.cli import app as cli_app  # noqa: E402
from hookline.config import Settings  # noqa: E402
from hookline.gateway import Gateway  # noqa: E402

HTTP_PAGE = ROOT / "docs" / "reference" / "http-api.md"
CLI_PAGE = ROOT / "docs" / "reference" / "cli.md"


def http_api() -> str:
    spec = create_app(Gateway(Settings(local_model=False))).openapi()
    out = [
        "# HTTP API reference",
        "",
        "Generated from the OpenAPI spec (`GET /openapi.json`) by `scripts/reference.py`. Every",
        "call under `/v1/` needs `Authorization: Bearer <key>` (the spec's `bearer` scheme); every",
        "error is `application/problem+json` (RFC 9457, the spec's `Problem` schema).",
        "",
        "The spec is the truth: each operation lists every status it can answer, and its request",
        "and response bodies as they are. `tests/test_fuzz.py` keeps it so: schemathesis fuzzes",
        "every operation of the spec against a live gateway and fails on a server error, a status",
        "or content type the spec does not list, or a body that does not match its schema.",
        "",
    ]
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            out.append(f"## `{method.upper()} {path}`")
            out.append("")
            out.append(operation.get("summary", "").strip())
            description = (operation.get("description") or "").strip()
            if description:
                out += ["", description]
            parameters = operation.get("parameters") or []
            if parameters:
                out += [
                    "",
                    "| parameter | in | required | description |",
                    "| --- | --- | --- | --- |",
                ]
                for parameter in parameters:
                    text = (
                        (parameter.get("description") or "").replace("\n", " ").replace("|", "\\|")
                    )
                    required = "yes" if parameter.get("required") else ""
                    out.append(
                        f"| `{parameter['name']}` | {parameter['in']} | {required} | {text} |"
                    )
            body = operation.get("requestBody", {}).get("content", {})
            if body:
                out += ["", "Request body: " + ", ".join(_media(k, v) for k, v in body.items())]
            statuses = ", ".join(f"`{code}`" for code in operation.get("responses", {}))
            out += ["", f"Responses: {statuses}", ""]
    return "\n".join(out).rstrip() + "\n"


def _media(kind: str, content: dict[str, Any]) -> str:
    """``kind``, with the name of its schema when it has one (``application/json`` (JobCreate))."""
    ref = content.get("schema", {}).get("$ref", "")
    name = ref.rpartition("/")[2]
    return f"`{kind}` ({name})" if name else f"`{kind}`"


def cli() -> str:
    command = typer.main.get_command(cli_app)
    out = [
        "# CLI reference",
        "",
        "Generated from `hookline --help` by `scripts/reference.py`.",
        "",
    ]

    def walk(group: Command, prefix: list[str]) -> None:
        commands = getattr(group, "commands", None)
        if commands:
            for name in sorted(commands):
                walk(commands[name], [*prefix, name])
            return
        context = Context(group, info_name=" ".join(prefix))
        out.append(f"## `{' '.join(prefix)}`")
        out.append("")
        out.append((group.help or "").strip())
        out.append("")
        rows = []
        for parameter in group.get_params(context):
            record: Any = parameter.get_help_record(context)
            if record is None:
                continue
            names, text = record
            text = text.replace("|", "\\|")
            rows.append(f"| `{names}` | {text} |")
        arguments = [p.name for p in group.params if isinstance(p, TyperArgument)]
        usage = " ".join([*prefix, *(a.upper() for a in arguments if a)])
        out.extend([f"Usage: `{usage} [OPTIONS]`", ""])
        if rows:
            out.extend(["| option | meaning |", "| --- | --- |", *rows, ""])

    walk(command, ["hookline"])
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    HTTP_PAGE.parent.mkdir(parents=True, exist_ok=True)
    HTTP_PAGE.write_text(http_api())
    CLI_PAGE.write_text(cli())
    print(f"wrote {HTTP_PAGE.relative_to(ROOT)} and {CLI_PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
