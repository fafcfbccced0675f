"""Files (kept in chunks) and batches, in SQL. A batch's items are jobs; its events go through
the job store under its anchor row (see :mod:`hookline.batches`)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from hookline.jobs import Job, JobStatus
from hookline.store.database import Database, chosen_once
from hookline.store.schema import batches, file_chunks, files, jobs

CHUNK_BYTES = 1024 * 1024
_CHUNKS_PER_READ = 4


@dataclasses.dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    tenant: str
    purpose: str
    filename: str
    bytes: int
    created_at: int

    @classmethod
    def from_row(cls, row: Any) -> FileRecord:
        return cls(**{f.name: row[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True, slots=True)
class BatchRecord:
    id: str
    tenant: str
    status: str
    endpoint: str
    input_file_id: str
    output_file_id: str | None
    error_file_id: str | None
    completion_window: str
    metadata: dict[str, str] | None
    errors: list[dict[str, Any]] | None
    item_events: list[str]
    total: int
    completed: int
    failed: int
    lines_queued: int
    created_at: int
    updated_at: int
    expires_at: int
    in_progress_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    progress_at: int | None

    @classmethod
    def from_row(cls, row: Any) -> BatchRecord:
        return cls(**{f.name: row[f.name] for f in dataclasses.fields(cls)})


class BatchStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    # --- files

    async def create_file(
        self, record: FileRecord, chunks: AsyncIterator[bytes], max_bytes: int
    ) -> FileRecord | None:
        """Store a file from its chunks, one short transaction per chunk (the whole file is never
        in memory). None, and nothing kept, when it passes ``max_bytes``."""
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
        """The file's content, a few chunks per read."""
        n = 0
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
        """The batch and its anchor row, together."""

        def insert(conn: Connection) -> None:
            conn.execute(sa.insert(batches), [row])
            conn.execute(sa.insert(jobs), [anchor.as_row()])

        await self.database.write(insert)

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

    async def update_batch(
        self, batch_id: str, values: dict[str, Any], *, statuses: Collection[str] = ()
    ) -> BatchRecord | None:
        """Change a batch (only while in one of ``statuses``, when given); the batch after."""
        statement = sa.update(batches).where(batches.c.id == batch_id)
        if statuses:
            statement = statement.where(batches.c.status.in_(list(statuses)))
        statement = statement.values(**values).returning(*batches.c)
        row = await self.database.write(lambda conn: conn.execute(statement).mappings().first())
        return BatchRecord.from_row(row) if row else None

    async def any_in(self, statuses: Collection[str]) -> bool:
        """Whether some batch is in one of ``statuses`` (a read, before any write)."""
        query = sa.select(batches.c.id).where(batches.c.status.in_(list(statuses))).limit(1)
        return await self.database.read(lambda conn: conn.execute(query).first() is not None)

    async def claim_batches(
        self, statuses: Collection[str], now: int, lease_token: str, lease_expires_at: int
    ) -> list[BatchRecord]:
        """Lease (or renew) the batches in ``statuses`` that this runner holds or no runner looks
        after (or whose runner's lease lapsed), so one runner at a time drives each."""
        due = (
            sa.select(batches.c.id)
            .where(
                batches.c.status.in_(list(statuses)),
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
        """A runner that stops hands its batches over at once."""
        statement = (
            sa.update(batches)
            .where(batches.c.lease_token == lease_token)
            .values(lease_token=None, lease_expires_at=None)
        )
        await self.database.write(lambda conn: conn.execute(statement))

    async def item_counts(self, batch_id: str) -> dict[str, int]:
        """How many of the batch's items are in each job status."""
        query = (
            sa.select(jobs.c.status, sa.func.count())
            .where(jobs.c.batch_id == batch_id)
            .group_by(jobs.c.status)
        )
        rows = await self.database.read(lambda conn: list(conn.execute(query)))
        return {status: int(count) for status, count in rows}

    async def items(self, batch_id: str, after_line: int, limit: int) -> list[Job]:
        """The batch's items in line order."""
        query = (
            sa.select(jobs)
            .where(jobs.c.batch_id == batch_id, jobs.c.batch_line > after_line)
            .order_by(jobs.c.batch_line)
            .limit(limit)
        )
        rows = await self.database.read(lambda conn: list(conn.execute(query).mappings()))
        return [Job.from_row(row) for row in rows]

    async def ended_without_event(self) -> list[BatchRecord]:
        """Batches that ended (their row says so) while their anchor still runs: the terminal
        event is still to be written."""
        query = (
            sa.select(batches)
            .join(jobs, jobs.c.id == batches.c.id)
            .where(
                batches.c.status.in_(["completed", "failed", "expired", "cancelled"]),
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
