"""The migrations build exactly the schema the code declares, on every database."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection

from hookline.store.database import open_database
from hookline.store.migrate import alembic_config, current_revision, head_revision, upgrade
from hookline.store.schema import metadata
from tests.conftest import gateway_settings, serve

# Alembic cannot reflect indexes with a DESC column on every dialect; these are checked by name.
_CHECKED_BY_NAME = {"ix_jobs_claim"}


def _skip_unreflectable(obj: Any, name: str | None, type_: str, *_: Any) -> bool:
    return not (type_ == "index" and name in _CHECKED_BY_NAME)


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "include_object": _skip_unreflectable}
    )
    return list(compare_metadata(context, metadata))


def _index_names(connection: Connection) -> set[str]:
    return {str(index["name"]) for index in sa.inspect(connection).get_indexes("jobs")}


async def test_migrated_schema_matches_the_models(database_url: str) -> None:
    database = open_database(database_url)  # the fixture's database is already migrated
    try:
        assert await database.read(_diff) == []
        assert await database.read(_index_names) >= _CHECKED_BY_NAME
        assert await current_revision(database) == head_revision()
        await upgrade(database)  # a second upgrade is a no-op
        assert await current_revision(database) == head_revision()
    finally:
        await database.dispose()


async def test_readiness_waits_for_a_schema_left_behind(tmp_path: Any, upstream: Any) -> None:
    # A process started --no-migrate against a database one release behind is not ready (and
    # says what to do) until `hookline migrate` has run; then it is.
    url = f"sqlite:///{tmp_path / 'behind.db'}"
    database = open_database(url)
    try:
        await database.write(lambda conn: command.upgrade(alembic_config(conn), "0003"))
    finally:
        await database.dispose()
    settings = gateway_settings(url, upstream.base_url)
    async with serve(settings, run_worker=False, migrate=False) as live:
        behind = await live.client.get("/readyz")
        assert behind.status_code == 503
        assert "run hookline migrate" in behind.json()["detail"]
        assert behind.json()["checks"]["schema"]["status"] == "failing"  # and it says which
        await upgrade(live.gateway.database)
        ready = await live.client.get("/readyz")
        assert ready.status_code == 200
        expected = {"status": "ready", "database": "ok", "schema": "current",
                    "revision": head_revision()}  # fmt: skip
        assert ready.json().items() >= expected.items()
