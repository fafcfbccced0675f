"""Database URLs and engines for SQLite (aiosqlite) and PostgreSQL (asyncpg).

SQLite gets two engines: one connection for writes, whose transactions start with ``BEGIN IMMEDIATE``
(so a writer never fails half-way on a lock upgrade and writers in this process queue up instead of
spinning on ``SQLITE_BUSY``), and a small pool for reads, which WAL lets run beside the writer.
PostgreSQL uses one pooled engine for both.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from hookline.errors import InvalidRequest

SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    # FULL: a commit is on disk before we answer 202. Batching accepts keeps the fsyncs few.
    "PRAGMA synchronous=FULL",
    "PRAGMA busy_timeout=10000",
    "PRAGMA foreign_keys=ON",
)


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


@dataclasses.dataclass(frozen=True)
class Engines:
    dialect: str  # "sqlite" or "postgresql"
    write: AsyncEngine
    read: AsyncEngine

    async def dispose(self) -> None:
        await self.write.dispose()
        if self.read is not self.write:
            await self.read.dispose()


def async_url(url: str) -> str:
    """Map a plain ``sqlite:///`` or ``postgresql://`` URL to its asyncio driver."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise InvalidRequest(f"not a database URL: {url!r}") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return str(parsed.set(drivername="sqlite+aiosqlite"))
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise InvalidRequest(f"unsupported database {backend!r}: use sqlite:/// or postgresql://")


def _sqlite_engine(url: str, *, writer: bool) -> AsyncEngine:
    engine = create_async_engine(
        url,
        poolclass=AsyncAdaptedQueuePool,
        pool_size=1 if writer else 4,
        max_overflow=0,
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so BEGIN is ours (SQLAlchemy's recipe).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

    return engine


def create_engines(url: str) -> Engines:
    driver_url = async_url(url)
    if driver_url.startswith("sqlite"):
        return Engines(
            "sqlite",
            _sqlite_engine(driver_url, writer=True),
            _sqlite_engine(driver_url, writer=False),
        )
    engine = create_async_engine(
        driver_url,
        pool_size=10,
        max_overflow=10,
        pool_pre_ping=True,
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
    )
    return Engines("postgresql", engine, engine)
