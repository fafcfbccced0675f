"""The CLI's help, as a user reads it at 80 columns: every option explained, values named by what
they are (SECONDS, URL, …), flags shown as flags, no summary cut short, ``--json`` on every
command a script reads."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import typer
from typer._click.core import Command, Context
from typer.core import TyperGroup

from hookline.cli import app

# The commands that print for people and scripts; the server commands only log.
SERVER_COMMANDS = {"serve", "api", "worker", "migrate"}


def commands(
    group: Command = typer.main.get_command(app), path: str = ""
) -> Iterator[tuple[str, Command]]:
    yield path, group
    for name, command in sorted(getattr(group, "commands", {}).items()):
        yield from commands(command, f"{path} {name}".strip())


def help_text(path: str, command: Command) -> str:
    context = Context(command, info_name=f"hookline {path}".strip(), terminal_width=80,
                      max_content_width=80)  # fmt: skip
    return command.get_help(context)


@pytest.mark.parametrize(("path", "command"), list(commands()), ids=lambda p: str(p) or "hookline")
def test_every_option_is_explained_and_named_by_what_it_takes(path: str, command: Command) -> None:
    options = help_text(path, command).split("Options:\n", 1)[-1]
    assert not re.search(r"<[a-z\[\]]+>", options), f"a type placeholder in {path!r}:\n{options}"
    context = Context(command)
    for parameter in command.get_params(context):
        record = parameter.get_help_record(context)
        if record is None:
            assert parameter.param_type_name == "argument", parameter.name
            assert getattr(parameter, "help", None), f"{path}: {parameter.name} has no help"
            continue
        names, explanation = record
        assert explanation and not explanation.startswith("["), f"{path}: {names} has no help"
        if parameter.param_type_name == "argument":
            continue
        if not getattr(parameter, "is_flag", False):  # the value's name says what it is
            assert re.fullmatch(r"[-\w, /]+ [A-Z_=]+", names), f"{path}: {names}"
        if re.search(r"timeout|ttl", names):
            assert names.endswith("SECONDS"), f"{path}: {names} has no unit"


def test_the_command_list_shows_every_summary_whole() -> None:
    text = help_text("", typer.main.get_command(app))
    listed = text.split("Commands:\n", 1)[1].splitlines()
    assert len(listed) == len(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    for line in listed:
        assert not line.rstrip().endswith("..."), f"cut short: {line!r}"
    for path, command in commands():
        if isinstance(command, TyperGroup):
            continue
        summary = (command.help or "").split("\n\n")[0]
        assert len(summary) <= 60 and "\n" not in summary.strip(), f"{path}: {summary!r}"


def test_every_command_a_script_reads_has_json() -> None:
    missing = [
        path
        for path, command in commands()
        if not isinstance(command, TyperGroup)
        and path not in SERVER_COMMANDS
        and not any("--json" in getattr(p, "opts", ()) for p in command.params)
    ]
    assert not missing, f"no --json: {missing}"
