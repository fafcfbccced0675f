"""The server commands: ``serve``, ``api``, ``worker`` and ``migrate``. Each turns its flags into
:class:`~hookline.config.Settings` and runs a :class:`~hookline.gateway.Gateway`."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from typing import Annotated

import typer

from hookline.cli.logs import configure_logging, redact_logs
from hookline.cli.options import (
    ConfigOpt,
    DatabaseOpt,
    HostOpt,
    LogOpt,
    MigrateOpt,
    PortOpt,
    console,
    settings,
)
from hookline.config import Settings

DevOpt = Annotated[
    bool | None,
    typer.Option(
        "--dev", envvar="HOOKLINE_DEV",
        help="Local development: webhooks may go to loopback and private addresses, such as a "
        "receiver on http://localhost:3000. Never in production.",
    ),
]  # fmt: skip


LogFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--log-format", envvar="HOOKLINE_LOG_FORMAT", metavar="FORMAT",
        help="text (default) or json: one JSON object per line, with job_id, tenant, upstream, "
        "attempt where they apply (docs/operations.md).",
    ),
]  # fmt: skip


def tune_interpreter() -> None:
    """Collect the young generation less often: a gateway makes many short-lived objects per
    request, and the default threshold (700) ran a collection every few requests (measured on the
    submit benchmark: +31% accepted jobs/s). Hand the GIL over every 0.5 ms instead of 5 ms: a
    SQLite commit finishing on the writer thread then waits at most that long for the busy event
    loop (see docs/benchmarks.md)."""
    gc.set_threshold(50_000, 50, 100)
    sys.setswitchinterval(0.0005)


def _serve_http(settings: Settings, *, run_worker: bool, migrate: bool = True) -> None:
    import uvicorn

    from hookline.api import create_app
    from hookline.api.server import server_options
    from hookline.gateway import Gateway

    configure_logging(settings.log_level, settings.log_format)
    tune_interpreter()
    gateway = Gateway(settings, run_worker=run_worker, migrate=migrate)
    config = uvicorn.Config(
        create_app(gateway),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        ws="websockets-sansio",
        timeout_graceful_shutdown=5,  # long-polls and streams are told to reconnect, not waited on
        **server_options(settings),  # limits on request heads, slow heads and bodies
    )
    redact_logs(settings.log_format)  # on the handlers the config just set up
    uvicorn.Server(config).run()


def serve(
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    log_level: LogOpt = None,
    dev: DevOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Run the API and the worker in one process.

    The database is migrated first. With --dev, webhooks may go to localhost (local development).
    """
    chosen = settings(
        config, database_url=database_url, host=host, port=port, log_level=log_level, dev=dev,
        log_format=log_format,
    )  # fmt: skip
    _serve_http(chosen, run_worker=True)


def api(
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    log_level: LogOpt = None,
    migrate: MigrateOpt = True,
    dev: DevOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Run only the HTTP API.

    Workers run elsewhere, against the same database (docs/deployment.md).
    """
    chosen = settings(
        config, database_url=database_url, host=host, port=port, log_level=log_level, dev=dev,
        log_format=log_format,
    )  # fmt: skip
    _serve_http(chosen, run_worker=False, migrate=migrate)


def worker(
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    log_level: LogOpt = None,
    migrate: MigrateOpt = True,
    dev: DevOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Run only a worker: it claims jobs and calls upstreams.

    Until SIGTERM; then it drains: running jobs may finish, for [worker] drain_seconds.
    """
    from hookline.gateway import Gateway

    chosen = settings(
        config, database_url=database_url, log_level=log_level, dev=dev, log_format=log_format
    )
    configure_logging(chosen.log_level, chosen.log_format)
    tune_interpreter()

    async def run() -> None:
        gateway = Gateway(chosen, run_worker=True, serve_api=False, migrate=migrate)
        await gateway.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logging.getLogger("hookline").info("draining: no new claims")
        await gateway.stop()

    asyncio.run(run())


def migrate(config: ConfigOpt = None, database_url: DatabaseOpt = None) -> None:
    """Bring the database schema up to date.

    Once per release, before starting the processes with --no-migrate.
    """
    from hookline.store import open_store
    from hookline.store.migrate import upgrade

    chosen = settings(config, database_url=database_url)

    async def run() -> None:
        store = await open_store(chosen.database_url)
        try:
            await upgrade(store.database)
        finally:
            await store.close()

    asyncio.run(run())
    console.print("database is up to date")
