"""The SQLAlchemy Core implementation of :class:`~hookline.store.base.Store`, for SQLite and
PostgreSQL alike. The statements that matter for correctness are named functions at the top.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from hookline.errors import StoreError, StoreUnavailable
from hookline.events import Event, EventType, NewEvent
from hookline.jobs import Job, JobStatus, sources_for
from hookline.store.base import AcceptOutcome, Store, Transitioned
from hookline.store.engines import Engines, create_engines
from hookline.store.schema import api_keys, events, jobs

# --- named statements


def _claimable_ids(upstream: str, limit: int, now: int) -> sa.Select[tuple[str]]:
    """Next runnable jobs of one upstream; on PostgreSQL rows locked by another claimer are skipped."""
    return (
        sa.select(jobs.c.id)
        .where(
            jobs.c.status == JobStatus.QUEUED.value,
            jobs.c.upstream == upstream,
            jobs.c.run_after <= now,
            sa.or_(jobs.c.expires_at.is_(None), jobs.c.expires_at > now),
        )
        .order_by(jobs.c.priority.desc(), jobs.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def _claim(ids: sa.Select[tuple[str]], now: int, lease_token: str, lease_expires_at: int) -> Any:
    return (
        sa.update(jobs)
        .where(jobs.c.id.in_(ids.scalar_subquery()), jobs.c.status == JobStatus.QUEUED.value)
        .values(
            status=JobStatus.RUNNING.value,
            attempts=jobs.c.attempts + 1,
            started_at=sa.func.coalesce(jobs.c.started_at, now),
            updated_at=now,
            lease_token=lease_token,
            lease_expires_at=lease_expires_at,
            event_seq=jobs.c.event_seq + 1,
        )
        .returning(*jobs.c)
    )


def _conditional_update(
    job_id: str,
    new_status: JobStatus,
    n_events: int,
    values: dict[str, Any],
    tenant: str | None,
    lease_token: str | None,
) -> Any:
    """UPDATE that only applies while the job is in a status allowed to move to ``new_status``."""
    conditions = [
        jobs.c.id == job_id,
        jobs.c.status.in_([s.value for s in sources_for(new_status)]),
    ]
    if tenant is not None:
        conditions.append(jobs.c.tenant == tenant)
    if lease_token is not None:
        conditions.append(jobs.c.lease_token == lease_token)
    return (
        sa.update(jobs)
        .where(*conditions)
        .values(status=new_status.value, event_seq=jobs.c.event_seq + n_events, **values)
        .returning(*jobs.c)
    )


def _bump_seq_if_held(job_id: str, lease_token: str, n_events: int, now: int) -> Any:
    return (
        sa.update(jobs)
        .where(
            jobs.c.id == job_id,
            jobs.c.status == JobStatus.RUNNING.value,
            jobs.c.lease_token == lease_token,
        )
        .values(event_seq=jobs.c.event_seq + n_events, updated_at=now)
        .returning(jobs.c.event_seq, jobs.c.tenant)
    )


_insert_events = sa.insert(events).returning(*events.c)

# --- error translation

_UNAVAILABLE_MARKERS = (
    "connection",
    "could not connect",
    "database is locked",
    "closed",
    "timeout",
)


def _translate(exc: BaseException) -> StoreError:
    if isinstance(exc, (OSError, ConnectionError)):
        return StoreUnavailable(f"database unreachable: {exc}")
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return StoreUnavailable(f"database connection lost: {exc.orig}")
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)):
        text = str(exc).lower()
        if any(marker in text for marker in _UNAVAILABLE_MARKERS):
            return StoreUnavailable(f"database unavailable: {exc}")
    return StoreError(f"database error: {exc}")


class SQLStore(Store):
    def __init__(self, engines: Engines) -> None:
        self.engines = engines
        self.dialect = engines.dialect

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self.engines.write.begin() as conn:
                yield conn
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            raise _translate(exc) from exc

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self.engines.read.connect() as conn:
                yield conn
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            raise _translate(exc) from exc

    async def close(self) -> None:
        await self.engines.dispose()

    async def ping(self) -> None:
        async with self._read() as conn:
            await conn.execute(sa.text("SELECT 1"))

    # API keys

    async def insert_api_key(
        self, key_id: str, tenant: str, key_hash: str, prefix: str, now: int
    ) -> None:
        async with self._write() as conn:
            await conn.execute(
                sa.insert(api_keys).values(
                    id=key_id, tenant=tenant, key_hash=key_hash, prefix=prefix, created_at=now
                )
            )

    async def tenant_for_key_hash(self, key_hash: str) -> str | None:
        async with self._read() as conn:
            result = await conn.execute(
                sa.select(api_keys.c.tenant).where(
                    api_keys.c.key_hash == key_hash, api_keys.c.revoked_at.is_(None)
                )
            )
            return result.scalar_one_or_none()

    # Jobs

    async def insert_jobs(self, items: Sequence[tuple[Job, NewEvent]]) -> list[AcceptOutcome]:
        if not items:
            return []
        try:
            async with self._write() as conn:
                return await self._insert_batch(conn, items)
        except StoreError as exc:
            if not isinstance(exc.__cause__, sa_exc.IntegrityError):
                raise
        if len(items) == 1:
            return [AcceptOutcome(items[0][0], duplicate=True)]
        # Some item of the batch reused an idempotency key: insert them one at a time instead.
        outcomes: list[AcceptOutcome] = []
        for item in items:
            outcomes.extend(await self.insert_jobs([item]))
        return outcomes

    async def _insert_batch(
        self, conn: AsyncConnection, items: Sequence[tuple[Job, NewEvent]]
    ) -> list[AcceptOutcome]:
        await conn.execute(sa.insert(jobs), [job.as_row() for job, _ in items])
        # No RETURNING here: nothing on the accept path needs the event's id, and it costs.
        await conn.execute(
            sa.insert(events),
            [_event_row(job, job.event_seq, event, job.created_at) for job, event in items],
        )
        return [AcceptOutcome(job) for job, _ in items]

    async def get_job(self, job_id: str, tenant: str | None = None) -> Job | None:
        query = sa.select(jobs).where(jobs.c.id == job_id)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        async with self._read() as conn:
            row = (await conn.execute(query)).mappings().first()
        return Job.from_row(row) if row else None

    async def find_job_by_idempotency_key(self, tenant: str, key: str) -> Job | None:
        query = sa.select(jobs).where(jobs.c.tenant == tenant, jobs.c.idempotency_key == key)
        async with self._read() as conn:
            row = (await conn.execute(query)).mappings().first()
        return Job.from_row(row) if row else None

    async def list_jobs(
        self,
        tenant: str,
        *,
        statuses: Collection[JobStatus] = (),
        operations: Collection[str] = (),
        before_id: str | None = None,
        limit: int = 50,
    ) -> list[Job]:
        query = sa.select(jobs).where(jobs.c.tenant == tenant)
        if statuses:
            query = query.where(jobs.c.status.in_([s.value for s in statuses]))
        if operations:
            query = query.where(jobs.c.operation.in_(list(operations)))
        if before_id:
            query = query.where(jobs.c.id < before_id)
        query = query.order_by(jobs.c.id.desc()).limit(limit)
        async with self._read() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [Job.from_row(row) for row in rows]

    async def list_events(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[Event]:
        query = (
            sa.select(events)
            .where(events.c.job_id == job_id, events.c.seq > after_seq)
            .order_by(events.c.seq)
            .limit(limit)
        )
        async with self._read() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [Event.from_row(row) for row in rows]

    async def claim_jobs(
        self,
        upstream: str,
        limit: int,
        *,
        now: int,
        lease_token: str,
        lease_expires_at: int,
    ) -> list[Transitioned]:
        if limit <= 0:
            return []
        async with self._write() as conn:
            statement = _claim(
                _claimable_ids(upstream, limit, now), now, lease_token, lease_expires_at
            )
            claimed = [Job.from_row(row) for row in (await conn.execute(statement)).mappings()]
            if not claimed:
                return []
            claimed.sort(key=lambda job: (-job.priority, job.id))
            started = [
                _event_row(
                    job,
                    job.event_seq,
                    NewEvent(EventType.STARTED, {"attempt": job.attempts}),
                    now,
                )
                for job in claimed
            ]
            rows = (await conn.execute(_insert_events, started)).mappings()
            by_job = {row["job_id"]: Event.from_row(row) for row in rows}
        return [Transitioned(job, [by_job[job.id]]) for job in claimed]

    async def renew_leases(
        self, job_ids: Collection[str], lease_token: str, lease_expires_at: int, now: int
    ) -> set[str]:
        if not job_ids:
            return set()
        statement = (
            sa.update(jobs)
            .where(
                jobs.c.id.in_(list(job_ids)),
                jobs.c.status == JobStatus.RUNNING.value,
                jobs.c.lease_token == lease_token,
            )
            .values(lease_expires_at=lease_expires_at, updated_at=now)
            .returning(jobs.c.id)
        )
        async with self._write() as conn:
            return set((await conn.execute(statement)).scalars())

    async def transition(
        self,
        job_id: str,
        new_status: JobStatus,
        *,
        now: int,
        changes: dict[str, Any] | None = None,
        events: Sequence[NewEvent] = (),
        tenant: str | None = None,
        lease_token: str | None = None,
    ) -> Transitioned | None:
        values = {"updated_at": now, **(changes or {})}
        statement = _conditional_update(
            job_id, new_status, len(events), values, tenant, lease_token
        )
        async with self._write() as conn:
            row = (await conn.execute(statement)).mappings().first()
            if row is None:
                return None
            job = Job.from_row(row)
            appended = await self._insert_events(conn, job, job.event_seq, events, now)
        return Transitioned(job, appended)

    async def append_events(
        self, job_id: str, lease_token: str, events: Sequence[NewEvent], now: int
    ) -> list[Event] | None:
        if not events:
            return []
        async with self._write() as conn:
            row = (
                await conn.execute(_bump_seq_if_held(job_id, lease_token, len(events), now))
            ).first()
            if row is None:
                return None
            last_seq, tenant = row
            rows = [
                {
                    "job_id": job_id,
                    "tenant": tenant,
                    "seq": last_seq - len(events) + i + 1,
                    "type": event.type.value,
                    "data": event.data,
                    "created_at": now,
                }
                for i, event in enumerate(events)
            ]
            result = (await conn.execute(_insert_events, rows)).mappings()
            return sorted((Event.from_row(r) for r in result), key=lambda e: e.seq)

    async def _insert_events(
        self, conn: AsyncConnection, job: Job, last_seq: int, new: Sequence[NewEvent], now: int
    ) -> list[Event]:
        if not new:
            return []
        first = last_seq - len(new) + 1
        rows = [_event_row(job, first + i, event, now) for i, event in enumerate(new)]
        result = (await conn.execute(_insert_events, rows)).mappings()
        return sorted((Event.from_row(r) for r in result), key=lambda e: e.seq)

    async def ids_past_ttl(self, now: int, limit: int) -> list[str]:
        query = (
            sa.select(jobs.c.id)
            .where(
                jobs.c.status == JobStatus.QUEUED.value,
                jobs.c.expires_at.is_not(None),
                jobs.c.expires_at <= now,
            )
            .limit(limit)
        )
        async with self._read() as conn:
            return list((await conn.execute(query)).scalars())

    async def lapsed_leases(self, now: int, limit: int) -> list[Job]:
        query = (
            sa.select(jobs)
            .where(jobs.c.status == JobStatus.RUNNING.value, jobs.c.lease_expires_at < now)
            .limit(limit)
        )
        async with self._read() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [Job.from_row(row) for row in rows]


def _event_row(job: Job, seq: int, event: NewEvent, now: int) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "tenant": job.tenant,
        "seq": seq,
        "type": event.type.value,
        "data": event.data,
        "created_at": now,
    }


async def open_store(database_url: str, *, migrate: bool = True) -> SQLStore:
    """Connect to ``database_url`` and, unless ``migrate`` is false, bring its schema up to date."""
    from hookline.migrate import upgrade

    engines = create_engines(database_url)
    if migrate:
        try:
            await upgrade(engines.write)
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            await engines.dispose()
            raise _translate(exc) from exc
    return SQLStore(engines)
