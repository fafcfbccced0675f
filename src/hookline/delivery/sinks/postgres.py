"""A PostgreSQL table (``asyncpg``, a core dependency): a row per message (``id``, ``type``,
``job_id``, ``tenant``, ``timestamp``, ``data`` as JSONB, the whole ``body`` as JSONB: the
webhook body, or the structured CloudEvent with ``envelope = "cloudevents"``), inserted
``ON CONFLICT (id) DO NOTHING`` so a resend never doubles a row. The table is created on first use
(with ``create``)."""

from __future__ import annotations

import datetime
from typing import Any

import asyncpg

from hookline.delivery.sinks.base import Sink, SinkMessage


def quoted(table: str) -> str:
    """``schema.table`` or ``table`` as quoted identifiers (checked by SinkConfig)."""
    return ".".join(f'"{part}"' for part in table.split("."))


class PostgresSink(Sink):
    _pool: Any = None

    async def _connect(self) -> Any:
        async with self.connecting:
            if self._pool is None:
                await self._open()
        return self._pool

    async def _open(self) -> None:
        url = self.config.url.replace("postgresql+asyncpg://", "postgresql://", 1)
        pool = await asyncpg.create_pool(
            url, min_size=0, max_size=4, timeout=self.config.timeout_seconds
        )
        table = quoted(self.config.target)
        self._insert = (
            f"INSERT INTO {table} (id, type, job_id, tenant, timestamp, data, body)"
            " VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb) ON CONFLICT (id) DO NOTHING"
        )
        if self.config.create:
            try:
                await pool.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} (id text PRIMARY KEY, type text NOT NULL,"
                    " job_id text, tenant text NOT NULL, timestamp timestamptz NOT NULL,"
                    " data jsonb, body jsonb NOT NULL,"
                    " received_at timestamptz NOT NULL DEFAULT now())",
                    timeout=self.config.timeout_seconds,
                )
            except BaseException:
                await pool.close()
                raise
        self._pool = pool

    async def publish(self, message: SinkMessage) -> None:
        pool = self._pool or await self._connect()
        moment = datetime.datetime.fromisoformat(message.timestamp)
        await pool.execute(
            self._insert, message.id, message.event_type, message.job_id, message.tenant,
            moment, message.data_json.decode(), message.body.decode(),
            timeout=self.config.timeout_seconds,
        )  # fmt: skip

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
