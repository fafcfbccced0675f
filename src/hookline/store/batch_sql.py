"""The SQL implementation of :class:`~hookline.store.base_batches.Batches`: files kept in 1 MB
chunks, and batches. A batch's items are jobs; its events go through the job store under its
anchor row (see :mod:`hookline.batches`)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from hookline.errors import StoreError
from hookline.jobs import Job, JobStatus
from hookline.store.base_batches import (
    TERMINAL_STATUSES,
    Batches,
    BatchRecord,
    BatchStatus,
    FileRecord,
    ProviderPart,
    sources_for,
)
from hookline.store.database import Database, chosen_once
from hookline.store.schema import (
    batches,
    deliveries,
    delivery_attempts,
    events,
    file_chunks,
    files,
    inbound_webhooks,
    jobs,
    provider_batches,
)

CHUNK_BYTES = 1024 * 1024
_CHUNKS_PER_READ = 4


class SQLBatches(Batches):
    def __init__(self, database: Database) -> None:
        self.database = database
        self.capabilities = database.capabilities

    # --- files

    async def create_file(
        self, record: FileRecord, chunks: AsyncIterator[bytes], max_bytes: int
    ) -> FileRecord | None:
        await self.database.write(lambda conn: conn.execute(sa.insert(files), [_row(record)]))
        size, n = 0, 0
        try:
            async for chunk in _rechunk(chunks):
                size += len(chunk)
                if size > max_bytes:
                    await self.delete_file(record.tenant, record.id)
                    return None
                await self.database.write(_chunk_writer(record.id, n, chunk))
                n += 1
        except BaseException:
            await self.delete_file(record.tenant, record.id)
            raise
        statement = sa.update(files).where(files.c.id == record.id).values(bytes=size)
        await self.database.write(lambda conn: conn.execute(statement))
        return dataclasses.replace(record, bytes=size)

    async def write_file(self, record: FileRecord, chunks: AsyncIterator[bytes]) -> FileRecord:
        written = await self.create_file(record, chunks, max_bytes=2**62)
        assert written is not None
        return written

    async def read_file(self, file_id: str) -> AsyncIterator[bytes]:
        n = 0  # a few chunks per read
        while True:
            query = (
                sa.select(file_chunks.c.data)
                .where(file_chunks.c.file_id == file_id, file_chunks.c.n >= n)
                .order_by(file_chunks.c.n)
                .limit(_CHUNKS_PER_READ)
            )
            datas = await self.database.read(lambda conn, q=query: list(conn.execute(q).scalars()))  # type: ignore[misc]
            for data in datas:
                yield bytes(data)
            if len(datas) < _CHUNKS_PER_READ:
                return
            n += len(datas)

    async def get_file(self, tenant: str, file_id: str) -> FileRecord | None:
        query = sa.select(files).where(files.c.id == file_id, files.c.tenant == tenant)
        row = await self.database.read(lambda conn: conn.execute(query).mappings().first())
        return FileRecord.from_row(row) if row else None

    async def list_files(
        self, tenant: str, purpose: str | None, after: str | None, limit: int
    ) -> list[FileRecord]:
        query = sa.select(files).where(files.c.tenant == tenant)
        if purpose:
            query = query.where(files.c.purpose == purpose)
        if after:
            query = query.where(files.c.id < after)
        query = query.order_by(files.c.id.desc()).limit(limit)
        rows = await self.database.read(lambda conn: list(conn.execute(query).mappings()))
        return [FileRecord.from_row(row) for row in rows]

    async def delete_file(self, tenant: str, file_id: str) -> bool:
        def delete(conn: Connection) -> bool:
            owned = files.c.id == file_id, files.c.tenant == tenant
            if conn.execute(sa.select(files.c.id).where(*owned)).first() is None:
                return False
            conn.execute(sa.delete(file_chunks).where(file_chunks.c.file_id == file_id))
            conn.execute(sa.delete(files).where(*owned))
            return True

        return await self.database.write(delete)

    # --- batches

    async def insert_batch(self, row: dict[str, Any], anchor: Job) -> None:
        def insert(conn: Connection) -> None:
            conn.execute(sa.insert(batches), [row])
            conn.execute(sa.insert(jobs), [anchor.as_row()])

        await self.database.write(insert)

    async def delete_batch(self, batch_id: str) -> None:
        def delete(conn: Connection) -> None:
            for owned in (jobs.c.batch_id == batch_id, jobs.c.id == batch_id):
                ids = sa.select(jobs.c.id).where(owned)
                messages = sa.select(deliveries.c.id).where(deliveries.c.job_id.in_(ids))
                conn.execute(
                    sa.delete(delivery_attempts).where(
                        delivery_attempts.c.delivery_id.in_(messages)
                    )
                )
                conn.execute(sa.delete(deliveries).where(deliveries.c.job_id.in_(ids)))
                conn.execute(sa.delete(events).where(events.c.job_id.in_(ids)))
                conn.execute(sa.delete(jobs).where(owned))
            conn.execute(sa.delete(provider_batches).where(provider_batches.c.batch_id == batch_id))
            conn.execute(sa.delete(batches).where(batches.c.id == batch_id))

        await self.database.write(delete)

    async def get_batch(self, batch_id: str, tenant: str | None = None) -> BatchRecord | None:
        query = sa.select(batches).where(batches.c.id == batch_id)
        if tenant is not None:
            query = query.where(batches.c.tenant == tenant)
        row = await self.database.read(lambda conn: conn.execute(query).mappings().first())
        return BatchRecord.from_row(row) if row else None

    async def list_batches(self, tenant: str, after: str | None, limit: int) -> list[BatchRecord]:
        query = sa.select(batches).where(batches.c.tenant == tenant)
        if after:
            query = query.where(batches.c.id < after)
        query = query.order_by(batches.c.id.desc()).limit(limit)
        rows = await self.database.read(lambda conn: list(conn.execute(query).mappings()))
        return [BatchRecord.from_row(row) for row in rows]

    async def update_batch(self, batch_id: str, values: dict[str, Any]) -> BatchRecord | None:
        if "status" in values:
            raise ValueError("a batch's status changes by transition()")
        return await self._update(sa.update(batches).where(batches.c.id == batch_id), values)

    async def transition(
        self, batch_id: str, new_status: BatchStatus, values: dict[str, Any]
    ) -> BatchRecord | None:
        allowed = [s.value for s in sorted(sources_for(new_status))]
        statement = sa.update(batches).where(
            batches.c.id == batch_id, batches.c.status.in_(allowed)
        )
        return await self._update(statement, {**values, "status": new_status.value})

    async def _update(self, statement: sa.Update, values: dict[str, Any]) -> BatchRecord | None:
        statement = statement.values(**values).returning(*batches.c)
        row = await self.database.write(lambda conn: conn.execute(statement).mappings().first())
        return BatchRecord.from_row(row) if row else None

    async def any_in(self, statuses: Collection[BatchStatus]) -> bool:
        query = sa.select(batches.c.id).where(batches.c.status.in_(_values(statuses))).limit(1)
        return await self.database.read(lambda conn: conn.execute(query).first() is not None)

    async def claim_batches(
        self,
        statuses: Collection[BatchStatus],
        now: int,
        lease_token: str,
        lease_expires_at: int,
    ) -> list[BatchRecord]:
        due = (
            sa.select(batches.c.id)
            .where(
                batches.c.status.in_(_values(statuses)),
                sa.or_(
                    batches.c.lease_token == lease_token,  # its own: renewed
                    batches.c.lease_expires_at.is_(None),
                    batches.c.lease_expires_at < now,
                ),
            )
            .limit(100)
            .with_for_update(skip_locked=True)
        )
        statement = (
            sa.update(batches)
            .where(batches.c.id.in_(chosen_once(due, "due_batches")))
            .values(lease_token=lease_token, lease_expires_at=lease_expires_at)
            .returning(*batches.c)
        )
        rows = await self.database.write(lambda conn: list(conn.execute(statement).mappings()))
        return [BatchRecord.from_row(row) for row in rows]

    async def release_batches(self, lease_token: str) -> None:
        statement = (
            sa.update(batches)
            .where(batches.c.lease_token == lease_token)
            .values(lease_token=None, lease_expires_at=None)
        )
        await self.database.write(lambda conn: conn.execute(statement))

    async def item_counts(self, batch_id: str) -> dict[str, int]:
        query = (
            sa.select(jobs.c.status, sa.func.count())
            .where(jobs.c.batch_id == batch_id)
            .group_by(jobs.c.status)
        )
        rows = await self.database.read(lambda conn: list(conn.execute(query)))
        return {status: int(count) for status, count in rows}

    async def items(self, batch_id: str, after_line: int, limit: int) -> list[Job]:
        query = (
            sa.select(jobs)
            .where(jobs.c.batch_id == batch_id, jobs.c.batch_line > after_line)
            .order_by(jobs.c.batch_line)
            .limit(limit)
        )
        rows = await self.database.read(lambda conn: list(conn.execute(query).mappings()))
        return [Job.from_row(row) for row in rows]

    async def ended_without_event(self) -> list[BatchRecord]:
        query = (
            sa.select(batches)
            .join(jobs, jobs.c.id == batches.c.id)
            .where(
                batches.c.status.in_(_values(TERMINAL_STATUSES)),
                jobs.c.status == JobStatus.RUNNING.value,
            )
            .limit(100)
        )
        rows = await self.database.read(lambda conn: list(conn.execute(query).mappings()))
        return [BatchRecord.from_row(row) for row in rows]

    async def queued_item_ids(self, batch_id: str, limit: int) -> list[str]:
        query = (
            sa.select(jobs.c.id)
            .where(jobs.c.batch_id == batch_id, jobs.c.status == JobStatus.QUEUED.value)
            .limit(limit)
        )
        return await self.database.read(lambda conn: list(conn.execute(query).scalars()))

    async def renew_batch_lease(self, batch_id: str, lease_token: str, until: int) -> bool:
        statement = (
            sa.update(batches)
            .where(batches.c.id == batch_id, batches.c.lease_token == lease_token)
            .values(lease_expires_at=until)
        )
        result = await self.database.write(lambda conn: conn.execute(statement).rowcount)
        return bool(result)

    # --- provider batches

    async def insert_parts(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            await self.database.write(lambda conn: conn.execute(sa.insert(provider_batches), rows))

    async def parts(self, batch_id: str) -> list[ProviderPart]:
        query = (
            sa.select(provider_batches)
            .where(provider_batches.c.batch_id == batch_id)
            .order_by(provider_batches.c.part)
        )
        rows = await self.database.read(lambda conn: list(conn.execute(query).mappings()))
        return [ProviderPart.from_row(row) for row in rows]

    async def update_part(self, part_id: str, values: dict[str, Any]) -> ProviderPart | None:
        statement = (
            sa.update(provider_batches)
            .where(provider_batches.c.id == part_id)
            .values(**values)
            .returning(*provider_batches.c)
        )
        row = await self.database.write(lambda conn: conn.execute(statement).mappings().first())
        return ProviderPart.from_row(row) if row else None

    async def part_items(
        self, batch_id: str, upstream: str, after_line: int, last_line: int, limit: int
    ) -> list[Job]:
        query = (
            sa.select(jobs)
            .where(
                jobs.c.batch_id == batch_id,
                jobs.c.batch_line > after_line,
                jobs.c.batch_line <= last_line,
                jobs.c.upstream == upstream,
            )
            .order_by(jobs.c.batch_line)
            .limit(limit)
        )
        rows = await self.database.read(lambda conn: list(conn.execute(query).mappings()))
        return [Job.from_row(row) for row in rows]

    async def open_part_items(
        self, batch_id: str, upstream: str, first_line: int, last_line: int, limit: int
    ) -> list[Job]:
        query = (
            sa.select(jobs)
            .where(
                jobs.c.batch_id == batch_id,
                jobs.c.batch_line >= first_line,
                jobs.c.batch_line <= last_line,
                jobs.c.upstream == upstream,
                jobs.c.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
            )
            .order_by(jobs.c.batch_line)
            .limit(limit)
        )
        rows = await self.database.read(lambda conn: list(conn.execute(query).mappings()))
        return [Job.from_row(row) for row in rows]

    async def provider_batch_ids(self, upstream: str) -> set[str]:
        statement = sa.select(provider_batches.c.provider_batch_id).where(
            provider_batches.c.upstream == upstream,
            provider_batches.c.provider_batch_id.is_not(None),
        )
        rows = await self.database.read(lambda conn: conn.execute(statement).all())
        return {str(row[0]) for row in rows}

    async def poke_part(self, upstream: str, provider_batch_id: str, now: int) -> str | None:
        statement = (
            sa.update(provider_batches)
            .where(
                provider_batches.c.upstream == upstream,
                provider_batches.c.provider_batch_id == provider_batch_id,
            )
            .values(next_poll_at=now)
            .returning(provider_batches.c.batch_id)
        )
        row = await self.database.write(lambda conn: conn.execute(statement).first())
        return None if row is None else str(row[0])

    async def record_inbound(self, upstream: str, webhook_id: str, now: int, forget: int) -> bool:
        def record(conn: Connection) -> bool:
            seen = sa.select(inbound_webhooks.c.upstream).where(
                inbound_webhooks.c.upstream == upstream,
                inbound_webhooks.c.webhook_id == webhook_id,
            )
            if conn.execute(seen).first() is not None:
                return False
            conn.execute(sa.delete(inbound_webhooks).where(inbound_webhooks.c.received_at < forget))
            conn.execute(
                sa.insert(inbound_webhooks).values(
                    upstream=upstream, webhook_id=webhook_id, received_at=now
                )
            )
            return True

        try:
            return await self.database.write(record)
        except StoreError:  # the same id inserted meanwhile, by another request
            if await self.database.read(
                lambda conn: conn.execute(
                    sa.select(inbound_webhooks.c.upstream).where(
                        inbound_webhooks.c.upstream == upstream,
                        inbound_webhooks.c.webhook_id == webhook_id,
                    )
                ).first()
            ):
                return False
            raise


def _values(statuses: Collection[BatchStatus]) -> list[str]:
    return sorted(status.value for status in statuses)


def _chunk_writer(file_id: str, n: int, data: bytes) -> Callable[[Connection], Any]:
    statement = sa.insert(file_chunks).values(file_id=file_id, n=n, data=data)
    return lambda conn: conn.execute(statement)


def _row(record: FileRecord) -> dict[str, Any]:
    return dataclasses.asdict(record)


async def _rechunk(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The same bytes in pieces of CHUNK_BYTES (the last one shorter)."""
    buffer = bytearray()
    async for piece in chunks:
        buffer += piece
        while len(buffer) >= CHUNK_BYTES:
            yield bytes(buffer[:CHUNK_BYTES])
            del buffer[:CHUNK_BYTES]
    if buffer:
        yield bytes(buffer)
