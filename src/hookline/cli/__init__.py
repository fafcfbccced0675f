"""The ``hookline`` command: run the gateway, manage keys, and submit and inspect jobs.

A thin layer, one module per side: :mod:`~hookline.cli.server` (``serve``, ``api``, ``worker``,
``migrate``) and :mod:`~hookline.cli.keys` turn flags into :class:`~hookline.config.Settings`;
:mod:`~hookline.cli.client_commands` (``submit``, ``jobs``, ``listen``, ``batch``,
``webhooks``) and :mod:`~hookline.cli.upstreams` call the gateway through
:class:`hookline.client.Client`, like any other caller. Every flag has a ``HOOKLINE_*``
environment twin. The commands are listed here, in the order ``--help`` shows them.
"""

from __future__ import annotations

import sys

import typer

from hookline.cli import client_commands, keys, server, sinks, tenants, upstreams

# Plain help (click's layout): flags show as flags, values by their metavar (SECONDS, URL, …),
# and each command's summary on one line.
_HELP = {"no_args_is_help": True, "rich_markup_mode": None}

app = typer.Typer(
    help="hookline: a self-hosted asynchronous AI gateway.",
    pretty_exceptions_enable=False,
    **_HELP,  # type: ignore[arg-type]
)
app.command()(server.serve)
app.command("api")(server.api)
app.command()(server.worker)
app.command()(server.migrate)
app.command()(client_commands.submit)
app.command()(client_commands.listen)

keys_app = typer.Typer(help="Create, list and revoke API keys (on the database directly).", **_HELP)  # type: ignore[arg-type]
keys_app.command("create")(keys.create)
keys_app.command("list")(keys.list_keys)
keys_app.command("revoke")(keys.revoke)
app.add_typer(keys_app, name="keys")
app.command()(tenants.tenants)
app.command()(upstreams.upstreams)

jobs_app = typer.Typer(help="Inspect and cancel your jobs.", **_HELP)  # type: ignore[arg-type]
jobs_app.command("list")(client_commands.jobs_list)
jobs_app.command("show")(client_commands.jobs_show)
jobs_app.command("tail")(client_commands.jobs_tail)
jobs_app.command("cancel")(client_commands.jobs_cancel)
app.add_typer(jobs_app, name="jobs")

batch_app = typer.Typer(help="Run batches of requests (OpenAI's Batch format).", **_HELP)  # type: ignore[arg-type]
batch_app.command("submit")(client_commands.batch_submit)
batch_app.command("results")(client_commands.batch_results)
app.add_typer(batch_app, name="batch")

webhooks_app = typer.Typer(help="Your tenant's webhook settings.", **_HELP)  # type: ignore[arg-type]
webhooks_app.command("secret")(client_commands.webhook_secret)
app.add_typer(webhooks_app, name="webhooks")


sinks_app = typer.Typer(help="Data sinks: list, test, replay.", no_args_is_help=True)
sinks_app.command("list")(sinks.list_sinks)
sinks_app.command("test")(sinks.test)
sinks_app.command("retry")(sinks.retry)
app.add_typer(sinks_app, name="sinks")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
