"""The SQLAlchemy Core implementation of :class:`~hookline.store.base.Store`, for SQLite and
PostgreSQL alike. Each method is one transaction: a plain function over a ``Connection`` handed to
:class:`~hookline.store.database.Database`. The statements that matter for correctness are named
functions at the top.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy import exc as sa_exc

from hookline.config import RateLimit
from hookline.errors import StoreError
from hookline.events import Event, EventType, NewEvent
from hookline.jobs import Job, JobStatus, sources_for
from hookline.store.base import AcceptOutcome, Appended, Claimed, Store, Transitioned
from hookline.store.batch_sql import BatchStore
from hookline.store.database import Database, chosen_once, open_database
from hookline.store.outbox import endpoints_by_tenant, enqueue_deliveries
from hookline.store.schema import api_keys, batches, events, jobs, upstream_rates
from hookline.store.webhook_sql import DeliveryStore

# --- named statements


def _claimable_ids(upstream: str, limit: int, now: int) -> sa.Select[tuple[str]]:
    """Next runnable jobs of one upstream; on PostgreSQL rows another claimer holds are skipped."""
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


def _lock_upstream(conn: Connection, upstream: str) -> None:
    """Hold the upstream's limits until the transaction ends. On PostgreSQL a transaction lock per
    upstream, so concurrent claimers count and take tokens one after the other and the global
    limits hold (on SQLite, write transactions run one at a time already)."""
    if conn.dialect.name == "postgresql":
        key = sa.func.hashtext(sa.literal(f"hookline.running:{upstream}"))
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))


def _running_count(conn: Connection, upstream: str) -> int:
    """Jobs of ``upstream`` running anywhere (call under :func:`_lock_upstream`)."""
    return int(conn.execute(_RUNNING_COUNT, {"upstream": upstream}).scalar_one())


# Built once: on the facade's accept path, building it cost more than running it.
_RUNNING_COUNT = (
    sa.select(sa.func.count())
    .select_from(jobs)
    .where(jobs.c.status == JobStatus.RUNNING.value, jobs.c.upstream == sa.bindparam("upstream"))
)


@dataclasses.dataclass
class _Bucket:
    """An upstream's token bucket as read (and refilled) in a claim transaction."""

    rate: RateLimit
    tokens: float
    stored: bool

    @classmethod
    def read(cls, conn: Connection, upstream: str, rate: RateLimit, now: int) -> _Bucket:
        row = conn.execute(
            sa.select(upstream_rates.c.tokens, upstream_rates.c.updated_at).where(
                upstream_rates.c.upstream == upstream
            )
        ).first()
        if row is None:
            return cls(rate, float(rate.burst), stored=False)
        refilled = row.tokens + max(0, now - row.updated_at) / 1000 * rate.per_second
        return cls(rate, min(float(rate.burst), refilled), stored=True)

    def take(self, conn: Connection, upstream: str, taken: int, now: int) -> int | None:
        """Spend ``taken`` tokens; when the bucket is left without a whole token, the time the
        next one arrives."""
        self.tokens -= taken
        values = {"tokens": self.tokens, "updated_at": now}
        if self.stored:
            table = upstream_rates
            conn.execute(sa.update(table).where(table.c.upstream == upstream).values(**values))
        else:
            conn.execute(sa.insert(upstream_rates).values(upstream=upstream, **values))
        if self.tokens >= 1:
            return None
        return now + math.ceil((1 - self.tokens) / self.rate.per_second * 1000)


def _claim(ids: sa.Select[tuple[str]], now: int, lease_token: str, lease_expires_at: int) -> Any:
    return (
        sa.update(jobs)
        .where(
            jobs.c.id.in_(chosen_once(ids, "claimable")), jobs.c.status == JobStatus.QUEUED.value
        )
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
) -> tuple[sa.Update, dict[str, Any]]:
    """UPDATE that only applies while the job is in a status allowed to move to ``new_status``,
    with its parameters."""
    statement = _conditional_update_statement(
        new_status, tuple(sorted(values)), tenant is not None, lease_token is not None
    )
    params = {"c_id": job_id, "c_tenant": tenant, "c_lease": lease_token, "c_n": n_events}
    params.update({f"v_{key}": value for key, value in values.items()})
    return statement, params


def _sql_string(value: str) -> sa.ColumnElement[str]:
    assert value.isidentifier(), value  # our own constants: nothing to escape
    return sa.literal_column(f"'{value}'", sa.String)


@functools.lru_cache(maxsize=256)
def _conditional_update_statement(
    new_status: JobStatus, keys: tuple[str, ...], by_tenant: bool, by_lease: bool
) -> sa.Update:
    # Built once per shape: building the statement cost more than running it.
    conditions = [
        jobs.c.id == sa.bindparam("c_id"),
        # The allowed statuses are constants of the statement: written into its text, they need
        # none of the per-execution expansion a bound list costs (~25 µs a transition).
        jobs.c.status.in_([_sql_string(s.value) for s in sorted(sources_for(new_status))]),
    ]
    if by_tenant:
        conditions.append(jobs.c.tenant == sa.bindparam("c_tenant"))
    if by_lease:
        conditions.append(jobs.c.lease_token == sa.bindparam("c_lease"))
    values = {key: sa.bindparam(f"v_{key}", type_=jobs.c[key].type) for key in keys}
    return (
        sa.update(jobs)
        .where(*conditions)
        .values(
            status=new_status.value,
            event_seq=jobs.c.event_seq + sa.bindparam("c_n", type_=sa.Integer),
            **values,
        )
        .returning(*jobs.c)
    )


# Bind b_job_id, b_lease_token, b_n (events) and b_now. Built once: building it cost more than running it.
_BUMP_SEQ_IF_HELD = (
    sa.update(jobs)
    .where(
        jobs.c.id == sa.bindparam("b_job_id"),
        jobs.c.status == JobStatus.RUNNING.value,
        jobs.c.lease_token == sa.bindparam("b_lease_token"),
    )
    .values(
        event_seq=jobs.c.event_seq + sa.bindparam("b_n", type_=sa.Integer),
        updated_at=sa.bindparam("b_now", type_=sa.BigInteger),
    )
    .returning(jobs.c.event_seq, jobs.c.tenant, jobs.c.webhook)
)


_insert_events = sa.insert(events).returning(*events.c)

# PostgreSQL: the oldest transaction id still running (every older one has committed or aborted).
_OLDEST_RUNNING_TRANSACTION = sa.literal_column(
    "pg_snapshot_xmin(pg_current_snapshot())::text::bigint", sa.BigInteger
)


def _within_running_limits(
    conn: Connection,
    items: Sequence[tuple[Job, NewEvent | Sequence[NewEvent]]],
    running_limits: Mapping[str, int],
) -> Sequence[tuple[Job, NewEvent | Sequence[NewEvent]]]:
    """The items, with jobs accepted already running turned back into queued ones where their
    upstream has no room left (they wait for a claim like any other)."""
    if all(job.status is not JobStatus.RUNNING for job, _ in items):
        return items
    room: dict[str, int] = {}
    kept: list[tuple[Job, NewEvent | Sequence[NewEvent]]] = []
    for job, given in items:
        limit = running_limits.get(job.upstream)
        if job.status is not JobStatus.RUNNING or limit is None:
            kept.append((job, given))
            continue
        if job.upstream not in room:
            _lock_upstream(conn, job.upstream)
            room[job.upstream] = limit - _running_count(conn, job.upstream)
        room[job.upstream] -= 1
        if room[job.upstream] >= 0:
            kept.append((job, given))
            continue
        first = given if isinstance(given, NewEvent) else given[0]
        queued = job.evolve(
            status=JobStatus.QUEUED, attempts=0, started_at=None, lease_token=None,
            lease_expires_at=None, event_seq=1,
        )  # fmt: skip
        kept.append((queued, first))
    return kept


def _event_row(job_id: str, tenant: str, seq: int, event: NewEvent, now: int) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "tenant": tenant,
        "seq": seq,
        "type": event.type.value,
        "data": event.data,
        "created_at": now,
    }


def _append(
    conn: Connection,
    job_id: str,
    tenant: str,
    last_seq: int,
    new: Sequence[NewEvent],
    now: int,
    *,
    job: Job | None,
    webhook: dict[str, Any] | None,
    endpoints: dict[str, list[Any]] | None = None,
) -> Appended:
    """Insert ``new`` as the events ending at ``last_seq`` (the job row was bumped already), and
    the webhook messages that report them."""
    if not new:
        return Appended([])
    first = last_seq - len(new) + 1
    rows = [_event_row(job_id, tenant, first + i, event, now) for i, event in enumerate(new)]
    result = conn.execute(_insert_events, rows).mappings()
    appended = sorted((Event.from_row(r) for r in result), key=lambda e: e.seq)
    reported = [(event, job, webhook) for event in appended]
    deliveries = enqueue_deliveries(conn, reported, now, endpoints)
    return Appended(appended, deliveries)


class SQLStore(Store):
    def __init__(self, database: Database) -> None:
        self.database = database
        self.dialect = database.dialect
        self.webhooks = DeliveryStore(database)
        self.batches = BatchStore(database)

    async def close(self) -> None:
        await self.database.dispose()

    async def ping(self) -> None:
        await self.database.read(lambda conn: conn.execute(sa.text("SELECT 1")).scalar())

    # API keys

    async def insert_api_key(
        self, key_id: str, tenant: str, key_hash: str, prefix: str, now: int
    ) -> None:
        statement = sa.insert(api_keys).values(
            id=key_id, tenant=tenant, key_hash=key_hash, prefix=prefix, created_at=now
        )
        await self.database.write(lambda conn: conn.execute(statement))

    async def tenant_for_key_hash(self, key_hash: str) -> str | None:
        query = sa.select(api_keys.c.tenant).where(
            api_keys.c.key_hash == key_hash, api_keys.c.revoked_at.is_(None)
        )
        tenant: str | None = await self.database.read(
            lambda conn: conn.execute(query).scalar_one_or_none()
        )
        return tenant

    # Jobs

    async def insert_jobs(
        self,
        items: Sequence[tuple[Job, NewEvent | Sequence[NewEvent]]],
        running_limits: Mapping[str, int] | None = None,
    ) -> list[AcceptOutcome]:
        if not items:
            return []

        def insert(conn: Connection) -> list[AcceptOutcome]:
            batch = items
            if running_limits is not None:
                batch = _within_running_limits(conn, items, running_limits)
            conn.execute(sa.insert(jobs), [job.as_row() for job, _ in batch])
            # No RETURNING: nothing on the accept path needs the event's id, and it costs.
            rows: list[tuple[Job, dict[str, Any]]] = []
            for job, given in batch:
                new = [given] if isinstance(given, NewEvent) else list(given)
                first = job.event_seq - len(new) + 1
                rows += [
                    (job, _event_row(job.id, job.tenant, first + i, event, job.created_at))
                    for i, event in enumerate(new)
                ]
            conn.execute(sa.insert(events), [row for _, row in rows])
            # The hot path: most jobs have no webhook and most tenants no endpoints, so only
            # the jobs that someone listens to are turned into events for the outbox.
            subscribed = endpoints_by_tenant(conn, {job.tenant for job, _ in batch})
            reported = [
                (Event.from_row({"id": 0, **row}), job, job.webhook)
                for job, row in rows
                if job.webhook or job.tenant in subscribed
            ]
            written = enqueue_deliveries(conn, reported, batch[0][0].created_at, subscribed)
            return [AcceptOutcome(job, deliveries=written) for job, _ in batch]

        try:
            return await self.database.write(insert)
        except StoreError as exc:
            if not isinstance(exc.__cause__, sa_exc.IntegrityError):
                raise
        if len(items) == 1:
            return [AcceptOutcome(items[0][0], duplicate=True)]
        # Some item of the batch reused an idempotency key: insert them one at a time instead.
        outcomes: list[AcceptOutcome] = []
        for item in items:
            outcomes.extend(await self.insert_jobs([item], running_limits))
        return outcomes

    async def _one_job(self, query: sa.Select[Any]) -> Job | None:
        def fetch(conn: Connection) -> Job | None:
            row = conn.execute(query).mappings().first()
            return Job.from_row(row) if row else None

        return await self.database.read(fetch)

    async def get_job(self, job_id: str, tenant: str | None = None) -> Job | None:
        query = sa.select(jobs).where(jobs.c.id == job_id)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        return await self._one_job(query)

    async def find_job_by_idempotency_key(self, tenant: str, key: str) -> Job | None:
        query = sa.select(jobs).where(jobs.c.tenant == tenant, jobs.c.idempotency_key == key)
        return await self._one_job(query)

    async def list_jobs(
        self,
        tenant: str,
        *,
        statuses: Collection[JobStatus] = (),
        operations: Collection[str] = (),
        before_id: str | None = None,
        limit: int = 50,
    ) -> list[Job]:
        # A batch's anchor row is not a job (hookline.batches).
        query = sa.select(jobs).where(jobs.c.tenant == tenant, jobs.c.operation != "batch")
        if statuses:
            query = query.where(jobs.c.status.in_([s.value for s in statuses]))
        if operations:
            query = query.where(jobs.c.operation.in_(list(operations)))
        if before_id:
            query = query.where(jobs.c.id < before_id)
        query = query.order_by(jobs.c.id.desc()).limit(limit)
        return await self.database.read(
            lambda conn: [Job.from_row(row) for row in conn.execute(query).mappings()]
        )

    async def list_events(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[Event]:
        where = (events.c.job_id == job_id, events.c.seq > after_seq)
        return await self._read_events(where, events.c.seq, limit)

    async def list_tenant_events(
        self, tenant: str, after_id: int = 0, limit: int = 1000
    ) -> list[Event]:
        where: tuple[sa.ColumnElement[bool], ...] = (
            events.c.tenant == tenant,
            events.c.id > after_id,
        )
        if self.dialect == "postgresql":
            # Ids are taken at insert, not at commit: an event of a transaction still running
            # may yet appear below ids already read. Only events of transactions older than
            # every running one are read (SQLite commits one writer at a time, in id order).
            where = (*where, events.c.txid < _OLDEST_RUNNING_TRANSACTION)
        return await self._read_events(where, events.c.id, limit)

    async def latest_tenant_event_id(self, tenant: str) -> int:
        query = sa.select(sa.func.max(events.c.id)).where(events.c.tenant == tenant)
        latest = await self.database.read(lambda conn: conn.execute(query).scalar())
        return int(latest or 0)

    async def _read_events(
        self, where: tuple[sa.ColumnElement[bool], ...], order: sa.Column[Any], limit: int
    ) -> list[Event]:
        query = sa.select(events).where(*where).order_by(order).limit(limit)
        return await self.database.read(
            lambda conn: [Event.from_row(row) for row in conn.execute(query).mappings()]
        )

    async def claim_jobs(
        self,
        upstream: str,
        limit: int,
        *,
        now: int,
        lease_token: str,
        lease_expires_at: int,
        max_running: int | None = None,
        rate: RateLimit | None = None,
    ) -> Claimed:
        if limit <= 0:
            return Claimed([])

        def claim(conn: Connection) -> Claimed:
            room = limit
            if max_running is not None or rate is not None:
                _lock_upstream(conn, upstream)
            if max_running is not None:
                room = min(room, max_running - _running_count(conn, upstream))
            bucket = _Bucket.read(conn, upstream, rate, now) if rate is not None else None
            if bucket is not None:
                room = min(room, int(bucket.tokens))
            if room <= 0:
                return Claimed([], bucket.take(conn, upstream, 0, now) if bucket else None)
            statement = _claim(
                _claimable_ids(upstream, room, now), now, lease_token, lease_expires_at
            )
            claimed = [Job.from_row(row) for row in conn.execute(statement).mappings()]
            next_token_at = bucket.take(conn, upstream, len(claimed), now) if bucket else None
            claimed.sort(key=lambda job: (-job.priority, job.id))
            results = []
            endpoints = endpoints_by_tenant(conn, {job.tenant for job in claimed})
            for job in claimed:
                started = NewEvent(EventType.STARTED, {"attempt": job.attempts})
                appended = _append(
                    conn, job.id, job.tenant, job.event_seq, [started], now,
                    job=job, webhook=job.webhook, endpoints=endpoints,
                )  # fmt: skip
                results.append(Transitioned(job, appended.events, appended.deliveries))
            return Claimed(results, next_token_at)

        return await self.database.write(claim)

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
        return await self.database.write(lambda conn: set(conn.execute(statement).scalars()))

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
        statement, params = _conditional_update(
            job_id, new_status, len(events), values, tenant, lease_token
        )

        def apply(conn: Connection) -> Transitioned | None:
            row = conn.execute(statement, params).mappings().first()
            if row is None:
                return None
            job = Job.from_row(row)
            appended = _append(
                conn, job.id, job.tenant, job.event_seq, events, now, job=job, webhook=job.webhook
            )
            return Transitioned(job, appended.events, appended.deliveries)

        return await self.database.write(apply)

    async def append_events(
        self, job_id: str, lease_token: str, events: Sequence[NewEvent], now: int
    ) -> Appended | None:
        return (await self.append_events_many([(job_id, lease_token, events)], now))[0]

    async def append_events_many(
        self, items: Sequence[tuple[str, str, Sequence[NewEvent]]], now: int
    ) -> list[Appended | None]:
        def append(conn: Connection) -> list[Appended | None]:
            results: list[Appended | None] = []
            held = []
            for job_id, lease_token, new in items:
                params = {
                    "b_job_id": job_id,
                    "b_lease_token": lease_token,
                    "b_n": len(new),
                    "b_now": now,
                }
                row = conn.execute(_BUMP_SEQ_IF_HELD, params).first() if new else None
                held.append(row)
            # One look at the tenants' endpoints for the whole batch, not one per job.
            endpoints = endpoints_by_tenant(conn, {row.tenant for row in held if row is not None})
            for (job_id, _, new), row in zip(items, held, strict=True):
                if row is None:
                    results.append(Appended([]) if not new else None)
                    continue
                last_seq, tenant, webhook = row
                results.append(
                    _append(conn, job_id, tenant, last_seq, new, now,
                            job=None, webhook=webhook, endpoints=endpoints)
                )  # fmt: skip
            return results

        return await self.database.write(append)

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
        return await self.database.read(lambda conn: list(conn.execute(query).scalars()))

    async def lapsed_leases(self, now: int, limit: int) -> list[Job]:
        query = (
            sa.select(jobs)
            # A literal status, so that the partial index ix_jobs_running_lease applies.
            .where(jobs.c.status == sa.literal_column("'running'"), jobs.c.lease_expires_at < now)
            .limit(limit)
        )
        return await self.database.read(
            lambda conn: [Job.from_row(row) for row in conn.execute(query).mappings()]
        )

    async def delete_finished_jobs(self, before: int, limit: int) -> int:
        oldest = (
            sa.select(jobs.c.id)
            .where(jobs.c.finished_at.is_not(None), jobs.c.finished_at < before)
            .order_by(jobs.c.finished_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )

        def delete(conn: Connection) -> int:
            ids = list(conn.execute(oldest).scalars())
            if ids:
                conn.execute(sa.delete(events).where(events.c.job_id.in_(ids)))
                conn.execute(sa.delete(batches).where(batches.c.id.in_(ids)))  # anchors' batches
                conn.execute(sa.delete(jobs).where(jobs.c.id.in_(ids)))
            return len(ids)

        return await self.database.write(delete)

    async def delete_settled_deliveries(self, before: int, limit: int) -> int:
        return await self.webhooks.delete_settled(before, limit)


async def open_store(database_url: str, *, migrate: bool = True) -> SQLStore:
    """Connect to ``database_url`` and, unless ``migrate`` is false, bring its schema up to date."""
    from hookline.migrate import upgrade

    database = open_database(database_url)
    if migrate:
        try:
            await upgrade(database)
        except BaseException:
            await database.dispose()
            raise
    return SQLStore(database)
