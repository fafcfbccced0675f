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
from hookline.deliveries import NO_SINKS, SinkRoutes
from hookline.errors import StoreError
from hookline.events import Event, EventType, NewEvent
from hookline.fairness import FairPolicy
from hookline.jobs import Job, JobStatus, Lane, Operation, sources_for
from hookline.store import claim as fair
from hookline.store import usage_sql
from hookline.store.base import (
    AcceptOutcome,
    Appended,
    Change,
    Claimed,
    LimitState,
    QueueAhead,
    Store,
    TenantOverview,
    Transitioned,
    UsageRow,
)
from hookline.store.batch_sql import SQLBatches
from hookline.store.database import Database, GroupedWrite, open_database
from hookline.store.insights_sql import SQLInsights
from hookline.store.key_sql import SQLKeys
from hookline.store.outbox import endpoints_by_tenant, enqueue_deliveries
from hookline.store.schema import (
    batches,
    deliveries,
    events,
    jobs,
    provider_batches,
    upstream_rates,
)
from hookline.store.webhook_sql import SQLDeliveries

# --- named statements


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


# A cancelled attempt's output so far: only the job's last attempt, and only once it is cancelled
# (a lease lost to another worker's take-over keeps nothing). One worker runs that attempt.
_KEEP_CANCELLED_OUTPUT = (
    sa.update(jobs)
    .where(
        jobs.c.id == sa.bindparam("b_id"),
        jobs.c.status == JobStatus.CANCELLED.value,
        jobs.c.attempts == sa.bindparam("b_attempt"),
    )
    .values(
        output=sa.bindparam("b_output", type_=jobs.c.output.type),
        input_tokens=sa.bindparam("b_input_tokens", type_=sa.Integer),
        output_tokens=sa.bindparam("b_output_tokens", type_=sa.Integer),
        updated_at=sa.bindparam("b_now", type_=sa.BigInteger),
    )
)

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

_IDEMPOTENCY_INDEX = next(i for i in jobs.indexes if i.name == "uq_jobs_tenant_idempotency_key")


def _reused_idempotency_key(exc: StoreError) -> bool:
    """Whether a failed write broke the uniqueness of a tenant's idempotency keys, and not some
    other constraint. PostgreSQL names the constraint (asyncpg's error, which SQLAlchemy's
    adapter chains); SQLite names the index's columns."""
    cause = exc.__cause__
    if not isinstance(cause, sa_exc.IntegrityError):
        return False
    driver_error = cause.orig
    asyncpg_error = getattr(driver_error, "__cause__", None)
    if getattr(asyncpg_error, "constraint_name", None) == _IDEMPOTENCY_INDEX.name:
        return True
    columns = ", ".join(f"{jobs.name}.{column.name}" for column in _IDEMPOTENCY_INDEX.columns)
    return str(driver_error) == f"UNIQUE constraint failed: {columns}"


# PostgreSQL: the oldest transaction id still running (every older one has committed or aborted).
_OLDEST_RUNNING_TRANSACTION = sa.literal_column(
    "pg_snapshot_xmin(pg_current_snapshot())::text::bigint", sa.BigInteger
)


def _within_running_limits(
    conn: Connection,
    items: Sequence[tuple[Job, NewEvent | Sequence[NewEvent]]],
    running_limits: Mapping[str, int],
    policy: FairPolicy | None = None,
) -> Sequence[tuple[Job, NewEvent | Sequence[NewEvent]]]:
    """The items, with jobs accepted already running turned back into queued ones where they
    may not start now: their upstream has no room left but for the interactive jobs queued
    for it, or their tenant (or the upstream's token limit) is at a limit. Those wait for a
    claim like any other."""
    running = [job for job, _ in items if job.status is JobStatus.RUNNING]
    if not running:
        return items
    now = running[0].created_at
    room: dict[str, int] = {}
    for upstream in sorted({job.upstream for job in running if job.upstream in running_limits}):
        _lock_upstream(conn, upstream)  # in name order: two accepts never wait on each other
        room[upstream] = running_limits[upstream] - _running_count(conn, upstream)
        if room[upstream] > 0:  # the claim owes those first
            room[upstream] -= fair.interactive_waiting(conn, upstream, now, room[upstream])
    limits: dict[str, fair.Limits] = {}
    started: list[Job] = []
    kept: list[tuple[Job, NewEvent | Sequence[NewEvent]]] = []
    for job, given in items:
        if job.status is not JobStatus.RUNNING or job.upstream not in room:
            kept.append((job, given))
            continue
        may_start = room[job.upstream] > 0
        if may_start and policy is not None and _checked(policy, job):
            if job.upstream not in limits:
                tenants = {j.tenant for j in running if j.upstream == job.upstream}
                limits[job.upstream] = fair.read_limits(conn, policy, job.upstream, tenants, now)
            may_start = fair.admits(limits[job.upstream], job)
        if may_start:
            room[job.upstream] -= 1
            started.append(job)
            kept.append((job, given))
            continue
        first = given if isinstance(given, NewEvent) else given[0]
        queued = job.evolve(
            status=JobStatus.QUEUED, attempts=0, started_at=None, lease_token=None,
            lease_expires_at=None, event_seq=1,
        )  # fmt: skip
        kept.append((queued, first))
    if policy is not None:
        fair.record_starts(conn, policy, started, now)
    return kept


def _checked(policy: FairPolicy, job: Job) -> bool:
    """Whether a start of ``job`` is held to limits beyond its upstream's concurrency."""
    return policy.limited(job.tenant) or job.upstream in policy.upstream_tokens_per_minute


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
    sinks: SinkRoutes = NO_SINKS,
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
    deliveries = enqueue_deliveries(conn, reported, now, endpoints, sinks)
    return Appended(appended, deliveries)


def _started(
    conn: Connection, claimed: Sequence[Job], now: int, sinks: SinkRoutes = NO_SINKS
) -> list[Transitioned]:
    """The ``job.started`` events of claimed jobs (their rows were bumped already), and the
    webhook messages that report them: one insert each, whatever the number of jobs."""
    if not claimed:
        return []
    rows = [
        _event_row(job.id, job.tenant, job.event_seq, NewEvent(
            EventType.STARTED, {"attempt": job.attempts, "upstream": job.upstream}), now)
        for job in claimed
    ]  # fmt: skip
    by_job = {
        row["job_id"]: Event.from_row(row) for row in conn.execute(_insert_events, rows).mappings()
    }
    endpoints = endpoints_by_tenant(conn, {job.tenant for job in claimed})
    reported = [(by_job[job.id], job, job.webhook) for job in claimed]
    written = enqueue_deliveries(conn, reported, now, endpoints, sinks)
    # The messages' count goes with the first job: it only tells whether the sender has news.
    return [
        Transitioned(job, [by_job[job.id]], written if i == 0 else 0)
        for i, job in enumerate(claimed)
    ]


def _insert_jobs(
    conn: Connection,
    items: Sequence[tuple[Job, NewEvent | Sequence[NewEvent]]],
    running_limits: Mapping[str, int] | None,
    policy: FairPolicy | None = None,
    sinks: SinkRoutes = NO_SINKS,
) -> list[AcceptOutcome]:
    """New jobs with their first events and their deliveries to the outbox, in few statements."""
    batch = items
    if running_limits is not None:
        batch = _within_running_limits(conn, items, running_limits, policy)
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
        if job.webhook or job.tenant in subscribed or (sinks and sinks.every_job(job.tenant))
    ]
    written = enqueue_deliveries(conn, reported, batch[0][0].created_at, subscribed, sinks)
    return [AcceptOutcome(job, deliveries=written) for job, _ in batch]


_Accept = tuple[Job, Sequence[NewEvent], int | None, FairPolicy | None]


def _accept_jobs(
    conn: Connection,
    items: list[_Accept],
    sinks: SinkRoutes = NO_SINKS,
) -> list[AcceptOutcome]:
    """:func:`_insert_jobs` for accepts that arrived together, each with its upstream's limit
    (and the queue's fair-sharing policy: the same for all)."""
    limits = {job.upstream: limit for job, _, limit, _ in items if limit is not None}
    policy = next((policy for *_, policy in items if policy is not None), None)
    batch = [(job, given) for job, given, _, _ in items]
    return _insert_jobs(conn, batch, limits, policy, sinks)


_EVEN = FairPolicy()  # every tenant of weight 1, no limits: for callers that pass no policy


class SQLStore(Store):
    def __init__(self, database: Database) -> None:
        self.database = database
        self.dialect = database.dialect
        self.capabilities = database.capabilities
        self.webhooks = SQLDeliveries(database)
        self.batches = SQLBatches(database)
        self.insights = SQLInsights(database)
        self.keys = SQLKeys(database)
        self._accepts = GroupedWrite("accept-jobs", _accept_jobs)

    async def close(self) -> None:
        await self.database.dispose()

    async def ping(self) -> None:
        await self.database.read(lambda conn: conn.execute(sa.text("SELECT 1")).scalar())

    # Jobs

    async def insert_jobs(
        self,
        items: Sequence[tuple[Job, NewEvent | Sequence[NewEvent]]],
        running_limits: Mapping[str, int] | None = None,
    ) -> list[AcceptOutcome]:
        if not items:
            return []

        try:
            return await self.database.write(
                lambda conn: _insert_jobs(conn, items, running_limits, sinks=self.sinks)
            )
        except StoreError as exc:
            if not _reused_idempotency_key(exc):
                raise  # any other broken constraint is a fault, not a replay
        if len(items) == 1:
            return [AcceptOutcome(items[0][0], duplicate=True)]
        # Some item of the batch reused an idempotency key: insert them one at a time instead.
        outcomes: list[AcceptOutcome] = []
        for item in items:
            outcomes.extend(await self.insert_jobs([item], running_limits))
        return outcomes

    async def accept_job(
        self,
        job: Job,
        first_events: Sequence[NewEvent],
        running_limit: int | None,
        policy: FairPolicy | None = None,
    ) -> AcceptOutcome:
        try:
            return await self.database.write_grouped(
                self._accepts, (job, first_events, running_limit, policy)
            )
        except StoreError as exc:
            if not _reused_idempotency_key(exc):
                raise
        return AcceptOutcome(job, duplicate=True)

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

    async def list_events(
        self,
        job_id: str,
        after_seq: int = 0,
        limit: int = 1000,
        types: Collection[EventType] = (),
    ) -> list[Event]:
        where: tuple[sa.ColumnElement[bool], ...] = (
            events.c.job_id == job_id,
            events.c.seq > after_seq,
        )
        if types:
            where = (*where, events.c.type.in_([t.value for t in types]))
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
        policy: FairPolicy | None = None,
    ) -> Claimed:
        if limit <= 0:
            return Claimed([])
        fair_policy = policy or _EVEN

        def claim(conn: Connection) -> Claimed:
            room = limit
            _lock_upstream(conn, upstream)  # claims of an upstream, one at a time: its passes
            if max_running is not None:
                room = min(room, max_running - _running_count(conn, upstream))
            bucket = _Bucket.read(conn, upstream, rate, now) if rate is not None else None
            if bucket is not None:
                room = min(room, int(bucket.tokens))
            if room <= 0:
                return Claimed([], bucket.take(conn, upstream, 0, now) if bucket else None)
            chosen = fair.claim_fairly(
                conn, upstream, room, now=now, lease_token=lease_token,
                lease_expires_at=lease_expires_at, policy=fair_policy,
            )  # fmt: skip
            claimed = chosen.jobs
            next_token_at = bucket.take(conn, upstream, len(claimed), now) if bucket else None
            if chosen.wake_at is not None:
                next_token_at = min(next_token_at or chosen.wake_at, chosen.wake_at)
            started = _started(conn, claimed, now, self.sinks)
            return Claimed(started, next_token_at, chosen.held_back)

        return await self.database.write(claim)

    async def limit_state(
        self, tenant: str, upstreams: Collection[str], now: int, key_id: str | None = None
    ) -> LimitState:
        return await self.database.read(
            lambda conn: usage_sql.limit_state(conn, tenant, upstreams, now, key_id)
        )

    async def tokens_spent(self, tenant: str, since: int, key_id: str | None = None) -> int:
        return await self.database.read(
            lambda conn: usage_sql.tokens_spent(conn, tenant, since, key_id)
        )

    async def usage_by_day(self, tenant: str, since: int) -> list[UsageRow]:
        return await self.database.read(lambda conn: usage_sql.usage_by_day(conn, tenant, since))

    async def tenants_overview(self, day: int, month: int) -> list[TenantOverview]:
        return await self.database.read(lambda conn: usage_sql.tenants_overview(conn, day, month))

    _sinks: SinkRoutes = NO_SINKS

    @property
    def sinks(self) -> SinkRoutes:
        """The configured data sinks, which take events beside the webhooks (the gateway sets
        them: every process that writes events routes to them)."""
        return self._sinks

    @sinks.setter
    def sinks(self, routes: SinkRoutes) -> None:
        self._sinks = routes
        self._accepts = GroupedWrite(
            "accept-jobs", lambda conn, items: _accept_jobs(conn, items, routes)
        )

    async def renew_leases(
        self, job_ids: Collection[str], lease_token: str, lease_expires_at: int, now: int
    ) -> set[str]:
        if not job_ids:
            return set()
        held = (jobs.c.status == JobStatus.RUNNING.value, jobs.c.lease_token == lease_token)
        ids = sorted(job_ids)
        # PostgreSQL: the rows are locked in id order first, the order every transaction that
        # touches several jobs' rows takes them in (append_events_many), so two never deadlock.
        lock = sa.select(jobs.c.id).where(jobs.c.id.in_(ids), *held).order_by(jobs.c.id)
        statement = (
            sa.update(jobs)
            .where(jobs.c.id.in_(ids), *held)
            .values(lease_expires_at=lease_expires_at, updated_at=now)
            .returning(jobs.c.id)
        )

        def renew(conn: Connection) -> set[str]:
            if conn.dialect.name == "postgresql":
                conn.execute(lock.with_for_update())
            return set(conn.execute(statement).scalars())

        return await self.database.write(renew)

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
        settle_tokens: int | None = None,
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
            if settle_tokens is not None:
                fair.settle(conn, job.id, job.attempts, settle_tokens)
            appended = _append(
                conn, job.id, job.tenant, job.event_seq, events, now, job=job,
                webhook=job.webhook, sinks=self.sinks,
            )  # fmt: skip
            return Transitioned(job, appended.events, appended.deliveries)

        return await self.database.write(apply)

    async def transition_many(
        self, changes: Sequence[Change], now: int
    ) -> list[Transitioned | None]:
        if not changes:
            return []
        statements = [
            _conditional_update(
                change.job_id, change.new_status, len(change.events),
                {"updated_at": now, **change.changes}, None, change.lease_token,
            )
            for change in changes
        ]  # fmt: skip

        def apply(conn: Connection) -> list[Transitioned | None]:
            rows = [
                conn.execute(statement, params).mappings().first()
                for statement, params in statements
            ]
            done = [Job.from_row(row) if row is not None else None for row in rows]
            tenants = {job.tenant for job in done if job is not None}
            endpoints = endpoints_by_tenant(conn, tenants) if tenants else {}
            results: list[Transitioned | None] = []
            for change, job in zip(changes, done, strict=True):
                if job is None:
                    results.append(None)
                    continue
                appended = _append(
                    conn, job.id, job.tenant, job.event_seq, change.events, now, job=job,
                    webhook=job.webhook, endpoints=endpoints, sinks=self.sinks,
                )  # fmt: skip
                results.append(Transitioned(job, appended.events, appended.deliveries))
            return results

        return await self.database.write(apply)

    async def append_events(
        self, job_id: str, lease_token: str, events: Sequence[NewEvent], now: int
    ) -> Appended | None:
        return (await self.append_events_many([(job_id, lease_token, events)], now))[0]

    async def append_events_many(
        self, items: Sequence[tuple[str, str, Sequence[NewEvent]]], now: int
    ) -> list[Appended | None]:
        # Rows are bumped in job id order, as renew_leases locks them: no deadlock between them.
        order = sorted(range(len(items)), key=lambda i: items[i][0])
        in_order = [items[i] for i in order]

        def append(conn: Connection) -> list[Appended | None]:
            results = append_in_order(conn)
            unsorted: list[Appended | None] = [None] * len(items)
            for position, result in zip(order, results, strict=True):
                unsorted[position] = result
            return unsorted

        def append_in_order(conn: Connection) -> list[Appended | None]:
            results: list[Appended | None] = []
            held = []
            for job_id, lease_token, new in in_order:
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
            for (job_id, _, new), row in zip(in_order, held, strict=True):
                if row is None:
                    results.append(Appended([]) if not new else None)
                    continue
                last_seq, tenant, webhook = row
                results.append(
                    _append(conn, job_id, tenant, last_seq, new, now,
                            job=None, webhook=webhook, endpoints=endpoints, sinks=self.sinks)
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

    async def queue_position(self, job: Job, since: int, cap: int) -> QueueAhead:
        lanes = list(Lane)  # in the order a claim serves them (hookline.fairness)
        earlier_lanes = [lane.value for lane in lanes[: lanes.index(job.lane)]]
        queued = (jobs.c.status == JobStatus.QUEUED.value, jobs.c.upstream == job.upstream)
        in_lane = (*queued, jobs.c.lane == job.lane.value)

        def capped(*where: sa.ColumnElement[bool]) -> sa.Select[Any]:
            found = sa.select(jobs.c.id).where(*where).limit(cap).subquery()
            return sa.select(sa.func.count()).select_from(found)

        earlier = capped(*queued, jobs.c.lane.in_(earlier_lanes))
        own = capped(
            *in_lane,
            jobs.c.tenant == job.tenant,
            sa.or_(
                jobs.c.priority > job.priority,
                sa.and_(jobs.c.priority == job.priority, jobs.c.id < job.id),
            ),
        )
        others_found = (
            sa.select(jobs.c.tenant).where(*in_lane, jobs.c.tenant != job.tenant).limit(cap)
        ).subquery()
        others = sa.select(others_found.c.tenant, sa.func.count()).group_by(others_found.c.tenant)
        finished = sa.select(sa.func.count()).where(
            jobs.c.finished_at >= since,
            jobs.c.upstream == job.upstream,
            jobs.c.status.in_([JobStatus.SUCCEEDED.value, JobStatus.FAILED.value]),
        )

        def read(conn: Connection) -> QueueAhead:
            return QueueAhead(
                int(conn.execute(earlier).scalar_one()) if earlier_lanes else 0,
                int(conn.execute(own).scalar_one()),
                {str(tenant): int(n) for tenant, n in conn.execute(others)},
                int(conn.execute(finished).scalar_one()),
            )

        return await self.database.read(read)

    async def lapse_all_leases(self, now: int) -> int:
        def lapse(conn: Connection) -> int:
            ended = 0
            for table in (jobs, deliveries, batches):
                result = conn.execute(
                    sa.update(table)
                    .where(table.c.lease_expires_at.is_not(None), table.c.lease_expires_at >= now)
                    .values(lease_expires_at=now - 1)
                )
                ended += result.rowcount
            return ended

        return await self.database.write(lapse)

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
                conn.execute(
                    sa.delete(provider_batches).where(provider_batches.c.batch_id.in_(ids))
                )
                conn.execute(sa.delete(batches).where(batches.c.id.in_(ids)))  # anchors' batches
                conn.execute(sa.delete(jobs).where(jobs.c.id.in_(ids)))
            return len(ids)

        return await self.database.write(delete)

    async def keep_cancelled_output(
        self,
        job_id: str,
        attempt: int,
        output: dict[str, Any],
        usage: tuple[int, int] | None,
        now: int,
    ) -> bool:
        params = {
            "b_id": job_id,
            "b_attempt": attempt,
            "b_output": output,
            "b_input_tokens": None if usage is None else usage[0],
            "b_output_tokens": None if usage is None else usage[1],
            "b_now": now,
        }
        return await self.database.write(
            lambda conn: conn.execute(_KEEP_CANCELLED_OUTPUT, params).rowcount == 1
        )

    async def delete_job(self, job_id: str, tenant: str) -> bool:
        finished = (
            sa.select(jobs.c.id)
            .where(
                jobs.c.id == job_id,
                jobs.c.tenant == tenant,
                jobs.c.finished_at.is_not(None),
                jobs.c.operation != Operation.BATCH.value,  # a batch's anchor goes with it
            )
            .with_for_update()
        )

        def delete(conn: Connection) -> bool:
            if conn.execute(finished).first() is None:
                return False
            conn.execute(sa.delete(events).where(events.c.job_id == job_id))
            conn.execute(sa.delete(jobs).where(jobs.c.id == job_id))
            return True

        return await self.database.write(delete)

    async def delete_settled_deliveries(self, before: int, limit: int) -> int:
        return await self.webhooks.delete_settled(before, limit)


async def open_store(database_url: str) -> SQLStore:
    """Connect to ``database_url`` and check that it answers (:class:`StoreUnavailable` if not).
    Opening never changes the schema: the gateway, or ``hookline migrate``, migrates first
    (:mod:`hookline.store.migrate`)."""
    store = SQLStore(open_database(database_url))
    try:
        await store.ping()
    except BaseException:
        await store.close()
        raise
    return store
