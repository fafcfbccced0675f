"""The migrations build exactly the schema the code declares, on every database."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection

from hookline.migrate import current_revision, head_revision, upgrade
from hookline.store.engines import create_engines
from hookline.store.schema import metadata


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def test_migrated_schema_matches_the_models(database_url: str) -> None:
    engines = create_engines(database_url)  # the fixture's database is already migrated
    try:
        async with engines.write.connect() as conn:
            assert await conn.run_sync(_diff) == []
        assert await current_revision(engines.write) == head_revision()
        await upgrade(engines.write)  # a second upgrade is a no-op
        assert await current_revision(engines.write) == head_revision()
    finally:
        await engines.dispose()
