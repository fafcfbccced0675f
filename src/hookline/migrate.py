"""Apply the Alembic migrations in ``hookline/migrations`` to a database.

``hookline serve`` upgrades at start; split deployments run ``hookline migrate`` once. On PostgreSQL
an advisory lock serialises processes that start together, so only one of them migrates.
"""

from __future__ import annotations

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


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


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
