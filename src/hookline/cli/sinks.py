"""``hookline sinks``: the data sinks in the config file, a test event to one, and replaying a
sink's dead letters, on the database directly (a running worker sends what is queued)."""

from __future__ import annotations

import asyncio
import datetime
from typing import Annotated, Any

import orjson
import typer

from hookline.cli.options import ConfigOpt, DatabaseOpt, JsonOpt, console, fail, settings
from hookline.config import Settings
from hookline.errors import HooklineError

TenantOpt = Annotated[
    str | None,
    typer.Option(
        "--tenant", metavar="TENANT", help="Only this tenant's messages (default: every one's)."
    ),
]


def _chosen(config: Any, database_url: str | None, name: str | None = None) -> Settings:
    chosen = settings(config, database_url=database_url)
    if name is not None and name not in {s.name for s in chosen.sinks}:
        known = ", ".join(s.name for s in chosen.sinks) or "none"
        fail(f"no sink {name!r} in the configuration (configured: {known})", 2)
    return chosen


def list_sinks(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List the configured sinks.

    Each with its name, kind, target, events and tenants (URLs, which may hold credentials, are
    not printed).
    """
    chosen = _chosen(config, None)
    rows: list[dict[str, Any]] = [
        {"name": s.name, "type": s.type, "target": s.target, "events": s.events,
         "tenants": s.tenants, "all_jobs": s.all_jobs}
        for s in chosen.sinks
    ]  # fmt: skip
    if as_json:
        print(orjson.dumps(rows).decode())
        return
    if not rows:
        console.print("no sinks configured ([[sinks]] in the config file; docs/sinks.md)")
    for row in rows:
        jobs = "every job" if row["all_jobs"] else "jobs that name it"
        console.print(
            f"{row['name']}  {row['type']} -> {row['target']}  {', '.join(row['events'])}  "
            f"tenants {', '.join(row['tenants'])}, {jobs}"
        )


def _run(chosen: Settings, work: Any) -> Any:
    from hookline.store import open_store

    async def run() -> Any:
        store = await open_store(chosen.database_url)
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except HooklineError as exc:
        fail(str(exc), 1)


def test(
    name: Annotated[str, typer.Argument(help="The sink's name.")],
    tenant: Annotated[
        str, typer.Option("--tenant", metavar="TENANT", help="On whose behalf.")
    ] = "ops",
    wait: Annotated[
        float,
        typer.Option("--wait", metavar="SECONDS", help="How long to wait for it to be sent."),
    ] = 30,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Send a test event to a sink, through a running worker.

    Queues a ``sink.test`` event and waits until the worker has sent it (exit 1 if it has not by
    then, with the last error).
    """
    chosen = _chosen(config, database_url, name)

    async def work(store: Any) -> tuple[str, Any]:
        from hookline.clock import SystemClock

        message_id = await store.webhooks.send_sink_test(tenant, name, SystemClock().now_ms())
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            found = await store.webhooks.get_delivery(tenant, message_id)
            delivery = found[0] if found else None
            if delivery is None or delivery.status.value != "pending":
                return message_id, delivery
            if asyncio.get_running_loop().time() > deadline:
                return message_id, delivery
            await asyncio.sleep(0.2)

    message_id, delivery = _run(chosen, work)
    if as_json:
        print(orjson.dumps({"id": message_id, "sink": name,
                            "delivery": delivery.as_json() if delivery else None}).decode())  # fmt: skip
    if delivery is not None and delivery.status.value == "succeeded":
        if not as_json:
            console.print(f"sent {message_id} to {name}")
        return
    error = delivery.last_error if delivery is not None else None
    fail(f"{message_id} not sent to {name} yet ({error or 'is a worker running?'})", 1)


def retry(
    name: Annotated[str, typer.Argument(help="The sink's name.")],
    tenant: TenantOpt = None,
    since: Annotated[
        datetime.datetime | None,
        typer.Option("--since", metavar="TIME", help="Only messages created since (ISO 8601)."),
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Send a sink's dead letters again, in their order.

    Dead letters are the messages that failed for good.
    """
    chosen = _chosen(config, database_url, name)
    since_ms = int(since.timestamp() * 1000) if since else None

    async def work(store: Any) -> int:
        from hookline.clock import SystemClock

        now = SystemClock().now_ms()
        count: int = await store.webhooks.resend_sink(name, now, tenant=tenant, since=since_ms)
        return count

    count = _run(chosen, work)
    if as_json:
        print(orjson.dumps({"sink": name, "queued": count}).decode())
    else:
        console.print(f"{count} message(s) of {name} queued again")
