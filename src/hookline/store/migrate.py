"""Apply the Alembic migrations in ``hookline/store/migrations`` to a database.

``hookline serve`` upgrades at start, and so do ``hookline api`` and ``hookline worker`` unless told
``--no-migrate`` (split deployments run ``hookline migrate`` once per release instead). On PostgreSQL
an advisory lock serialises processes that start together, so only one of them migrates.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from hookline.store.database import Database

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_ADVISORY_LOCK_ID = 0x686F6F6B  # "hook"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


@functools.cache
def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


@functools.cache
def _known_revisions() -> frozenset[str]:
    scripts = ScriptDirectory.from_config(alembic_config())
    return frozenset(script.revision for script in scripts.walk_revisions())


def upgrade_connection(connection: Connection) -> None:
    """Upgrade through an open connection, inside its transaction."""
    if connection.dialect.name == "postgresql":
        connection.execute(text(f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK_ID})"))
    command.upgrade(alembic_config(connection), "head")


def _current_sync(connection: Connection) -> Any:
    return MigrationContext.configure(connection).get_current_revision()


async def upgrade(database: Database) -> None:
    """Bring the schema up to the newest migration (no-op when it is current)."""
    await database.write(upgrade_connection)


async def current_revision(database: Database) -> str | None:
    revision: str | None = await database.read(_current_sync)
    return revision


async def schema_state(database: Database) -> tuple[str, str | None]:
    """Where the database's schema stands for this version of hookline: ``current``,
    ``behind`` (``hookline migrate`` is due), ``newer`` (migrated by a newer hookline: a rolling
    upgrade), or ``empty``; with the database's revision."""
    revision = await current_revision(database)
    if revision is None:
        return "empty", None
    if revision == head_revision():
        return "current", revision
    return ("behind" if revision in _known_revisions() else "newer"), revision
