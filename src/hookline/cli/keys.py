"""``hookline keys``: create, list and revoke API keys, on the database directly (no gateway needs
to run). A revocation reaches the running API processes at once (see :mod:`hookline.auth`)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from hookline.cli.options import (
    ConfigOpt,
    DatabaseOpt,
    JsonOpt,
    err_console,
    fail,
    print_columns,
    print_json,
    settings,
)
from hookline.config import Settings
from hookline.errors import HooklineError, InvalidRequest

if TYPE_CHECKING:  # the store loads when a command runs: `hookline --help` stays quick
    from hookline.auth import KeyRing

T = TypeVar("T")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _limit(flag: str, text: str) -> Any:
    """An option for one of a key's own limits (hookline.fairness.KeyLimits)."""
    return typer.Option(flag, metavar="N", min=1, help=text)


TenantOpt = Annotated[
    str | None,
    typer.Option("--tenant", metavar="TENANT", help="Only the keys of this tenant."),
]


def parse_duration(text: str) -> float:
    """Seconds in ``90d``, ``12h``, ``30m``, ``45s`` or ``45``."""
    found = _DURATION.match(text)
    if found is None or float(found[1]) <= 0:
        raise InvalidRequest(f"{text!r} is not a duration such as 90d, 12h, 30m or 3600s")
    return float(found[1]) * _UNIT_SECONDS[found[2]]


def _run(chosen: Settings, use: Callable[[KeyRing], Awaitable[T]]) -> T:
    """``use(keys)`` on the database; a failure is one line on stderr (exit 2: a bad value)."""

    async def run() -> T:
        async with _keyring(chosen) as keys:
            return await use(keys)

    try:
        return asyncio.run(run())
    except InvalidRequest as exc:
        fail(str(exc), 2)
    except HooklineError as exc:
        fail(str(exc))


@contextlib.asynccontextmanager
async def _keyring(chosen: Settings) -> AsyncIterator[KeyRing]:
    from hookline.auth import KeyRing
    from hookline.store import open_store
    from hookline.store.migrate import upgrade

    store = await open_store(chosen.database_url)
    try:
        await upgrade(store.database)  # as every server command does at start
        yield KeyRing(store)
    finally:
        await store.close()


def create(
    tenant: Annotated[
        str, typer.Option("--tenant", metavar="TENANT", help="The tenant the key acts for.")
    ],
    name: Annotated[
        str | None,
        typer.Option("--name", metavar="TEXT", help="What the key is for, shown in the list."),
    ] = None,
    expires_in: Annotated[
        str | None,
        typer.Option(
            "--expires-in",
            metavar="DURATION",
            help="Refuse the key after this long: 90d, 12h, 30m or 3600s.  [default: never]",
        ),
    ] = None,
    admin: Annotated[
        bool,
        typer.Option("--admin", help="The key may also call the admin API (/v1/admin/keys)."),
    ] = False,
    weight: Annotated[
        float | None,
        typer.Option(
            "--weight",
            metavar="WEIGHT",
            help="Set the tenant's weight in fair sharing (its share of a busy upstream; "
            "default 1), for all its keys. A weight in its [[tenants]] entry wins.",
        ),
    ] = None,
    max_concurrency: Annotated[
        int | None,
        _limit("--max-concurrency", "Jobs of the key running at once, on every upstream."),
    ] = None,
    requests_per_minute: Annotated[
        int | None,
        _limit("--requests-per-minute", "Calls the key's jobs start in a rolling minute."),
    ] = None,
    tokens_per_minute: Annotated[
        int | None,
        _limit("--tokens-per-minute", "Input + output tokens of those calls, in a rolling minute."),
    ] = None,
    daily_token_budget: Annotated[
        int | None,
        _limit("--daily-token-budget", "Tokens of the jobs the key submits in a UTC day."),
    ] = None,
    monthly_token_budget: Annotated[
        int | None,
        _limit("--monthly-token-budget", "Tokens of those jobs in a UTC calendar month."),
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Create an API key for a tenant and print it.

    This is the only time the key is shown: only its hash is stored. A key may have limits of
    its own, within its tenant's: over one, its jobs wait (and its callers who wait on the
    answer get 429) while the tenant's other keys go on.
    """
    chosen = settings(config, database_url=database_url)
    try:
        lifetime = parse_duration(expires_in) if expires_in is not None else None
    except InvalidRequest as exc:
        fail(str(exc), 2)

    from hookline.fairness import KeyLimits

    limits = KeyLimits(
        max_concurrency, requests_per_minute, tokens_per_minute, daily_token_budget,
        monthly_token_budget,
    )  # fmt: skip

    async def issue(keys: KeyRing) -> tuple[str, dict[str, object]]:
        now = keys.clock.now_ms()
        expires_at = None if lifetime is None else now + int(lifetime * 1000)
        key, record = await keys.issue(
            tenant, name=name, expires_at=expires_at, admin=admin, weight=weight, limits=limits
        )
        return key, record.as_json(now)

    key, record = _run(chosen, issue)
    entry = next((t for t in chosen.tenants if t.name == tenant), None)
    if weight is not None and entry is not None and "weight" in entry.model_fields_set:
        err_console.print(
            f"weight {weight:g} stored, but the [[tenants]] entry of {tenant} sets "
            f"weight = {entry.weight:g}, which wins",
            markup=False,
        )
    if as_json:
        print_json({**record, "key": key})
    else:
        print(key)


def list_keys(
    tenant: TenantOpt = None,
    include_unusable: Annotated[
        bool, typer.Option("--all", help="Revoked and expired keys too.")
    ] = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """List API keys, oldest first.

    Each with its id, tenant, name, prefix, creation, expiry, last use (to the minute) and
    its own limits, if any.
    """
    chosen = settings(config, database_url=database_url)

    async def found(keys: KeyRing) -> list[dict[str, object]]:
        now = keys.clock.now_ms()
        listed = await keys.list(tenant, include_unusable=include_unusable)
        return [key.as_json(now) for key in listed]

    listed = _run(chosen, found)
    if as_json:
        print_json({"object": "list", "data": listed})
        return
    if not listed:
        err_console.print("no keys" + (f" of tenant {tenant}" if tenant else ""))
        return
    headers = ["id", "tenant", "name", "prefix", "created", "expires", "last used"]
    with_limits = any(key["limits"] for key in listed)  # a column only when a key has some
    if with_limits:
        headers.append("limits")
    if include_unusable:
        headers.append("status")
    rows = []
    for key in listed:
        row = [str(key["id"]), str(key["tenant"]), str(key["name"] or "-"), f"{key['prefix']}…"]
        row += [_when(key["created_at"]), _when(key["expires_at"], "never")]
        row.append(_when(key["last_used_at"], "never"))
        if with_limits:
            row.append(_limits(key["limits"]))
        if include_unusable:
            row.append(str(key["status"]))
        if key["admin"]:
            row[2] += " (admin)"
        rows.append(row)
    print_columns(headers, rows)


def revoke(
    key: Annotated[
        str,
        typer.Argument(metavar="KEY", help="The key's id (key_…, from `keys list`), or the key."),
    ],
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Revoke an API key: every API process refuses it at once.

    The next request with the key gets 401, on SQLite and PostgreSQL alike.
    """
    chosen = settings(config, database_url=database_url)

    async def revoked(keys: KeyRing) -> tuple[bool, dict[str, object] | None]:
        done = await keys.revoke(key)
        if done and keys.store.capabilities.listen_notify:
            # The API processes hear of it on their broadcast; this process runs none.
            from hookline.live.broadcast import publish_once
            from hookline.live.notify import KEYS_REVOKED

            await publish_once(chosen.database_url, KEYS_REVOKED)
        record = await keys.find(key)
        return done, None if record is None else record.as_json(keys.clock.now_ms())

    done, record = _run(chosen, revoked)
    if record is None:
        fail(f"no key {key[:14]!r}: give its id (key_…, see `hookline keys list`) or the key")
    if as_json:
        print_json(record)
    elif done:
        print(f"revoked {record['id']} ({record['tenant']}, {record['name'] or 'no name'})")
    else:
        print(f"{record['id']} was revoked already, at {record['revoked_at']}")


_SHORT = {"max_concurrency": "concurrency", "requests_per_minute": "rpm",
          "tokens_per_minute": "tpm", "daily_token_budget": "daily", "monthly_token_budget": "monthly"}  # fmt: skip


def _limits(limits: object) -> str:
    """A key's own limits, short: ``concurrency=2 rpm=60``."""
    if not isinstance(limits, dict) or not limits:
        return "-"
    return " ".join(f"{_SHORT.get(name, name)}={value}" for name, value in limits.items())


def _when(iso: object, missing: str = "-") -> str:
    """An API time (ISO 8601) to the minute, in UTC."""
    if not isinstance(iso, str):
        return missing
    moment = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M")
