"""The SQL implementation of :class:`~hookline.store.base_insights.Insights`. Every query is a
read that an index bounds (listings page by id, the charts read ``ix_jobs_finished``'s range)."""

from __future__ import annotations

from typing import Any, TypeAlias, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection

from hookline.deliveries import Delivery, Endpoint
from hookline.jobs import Job
from hookline.observability.metrics import DatabaseGauges
from hookline.store.base_batches import BatchRecord
from hookline.store.base_insights import Insights, JobFilter, Kind, MinuteCounts, UpstreamLoad
from hookline.store.database import Database
from hookline.store.schema import batches, deliveries, jobs, webhook_endpoints

_NOT_ANCHOR = jobs.c.operation != "batch"  # a batch's anchor row is not a job


Statement: TypeAlias = "sa.Select[*tuple[Any, ...]]"
Q = TypeVar("Q", bound=Statement)


def _of(query: Q, table: sa.Table, tenant: str | None) -> Q:
    return query if tenant is None else query.where(table.c.tenant == tenant)


def _queued(tenant: str | None) -> Statement:
    query = sa.select(jobs.c.upstream, sa.func.count(), sa.func.min(jobs.c.created_at))
    query = query.where(jobs.c.status == "queued", _NOT_ANCHOR).group_by(jobs.c.upstream)
    return _of(query, jobs, tenant)


def _running(tenant: str | None) -> Statement:
    query = sa.select(jobs.c.upstream, sa.func.count())
    query = query.where(jobs.c.status == "running", _NOT_ANCHOR).group_by(jobs.c.upstream)
    return _of(query, jobs, tenant)


def _outbox(tenant: str | None) -> Statement:
    query = sa.select(sa.func.count(), sa.func.min(deliveries.c.created_at))
    return _of(query.where(deliveries.c.status == "pending"), deliveries, tenant)


def _endpoints(tenant: str | None) -> Statement:
    enabled, failing_since = webhook_endpoints.c.enabled, webhook_endpoints.c.failing_since
    query = sa.select(
        sa.func.count().filter(sa.and_(enabled, failing_since.is_not(None))),
        sa.func.count().filter(sa.not_(enabled)),
    )
    return _of(query, webhook_endpoints, tenant)


def _batches(tenant: str | None) -> Statement:
    query = sa.select(batches.c.status, sa.func.count()).group_by(batches.c.status)
    return _of(query, batches, tenant)


# The gauges of /metrics, built once (they are read at every scrape).
_ALL = (_queued(None), _running(None), _outbox(None), _endpoints(None), _batches(None))
_TABLES: dict[str, sa.Table] = {
    "job": jobs,
    "delivery": deliveries,
    "endpoint": webhook_endpoints,
    "batch": batches,
}


class SQLInsights(Insights):
    def __init__(self, database: Database) -> None:
        self.database = database

    async def gauges(self, now: int, tenant: str | None = None) -> DatabaseGauges:
        queued, running, outbox, endpoints, by_status = (
            _ALL if tenant is None
            else (_queued(tenant), _running(tenant), _outbox(tenant), _endpoints(tenant),
                  _batches(tenant))
        )  # fmt: skip

        def read(conn: Connection) -> DatabaseGauges:
            pending, oldest = conn.execute(outbox).one()
            failing, disabled = conn.execute(endpoints).one()
            return DatabaseGauges(
                queued={u: (int(n), at) for u, n, at in conn.execute(queued)},
                running={u: int(n) for u, n in conn.execute(running)},
                outbox_pending=int(pending or 0), outbox_oldest=oldest,
                endpoints_failing=int(failing or 0), endpoints_disabled=int(disabled or 0),
                batches={s: int(n) for s, n in conn.execute(by_status)}, now=now,
            )  # fmt: skip

        return await self.database.read(read)

    async def jobs(
        self, tenant: str | None, where: JobFilter, before_id: str | None, limit: int
    ) -> list[Job]:
        query = sa.select(jobs).where(_NOT_ANCHOR)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        if where.statuses:
            query = query.where(jobs.c.status.in_(list(where.statuses)))
        if where.operations:
            query = query.where(jobs.c.operation.in_(list(where.operations)))
        if where.model:
            query = query.where(jobs.c.model == where.model)
        if where.upstream:
            query = query.where(jobs.c.upstream == where.upstream)
        if where.since is not None:
            query = query.where(jobs.c.created_at >= where.since)
        if where.until is not None:
            query = query.where(jobs.c.created_at < where.until)
        if before_id:
            query = query.where(jobs.c.id < before_id)
        query = query.order_by(jobs.c.id.desc()).limit(limit)
        return await self.database.read(
            lambda conn: [Job.from_row(row) for row in conn.execute(query).mappings()]
        )

    async def deliveries(
        self,
        tenant: str | None,
        *,
        status: str | None = None,
        endpoint_id: str | None = None,
        job_id: str | None = None,
        sink: str | None = None,
        before_id: str | None = None,
        limit: int = 50,
    ) -> list[Delivery]:
        query = sa.select(deliveries)
        for column, value in (
            (deliveries.c.tenant, tenant),
            (deliveries.c.status, status),
            (deliveries.c.endpoint_id, endpoint_id),
            (deliveries.c.job_id, job_id),
            (deliveries.c.sink, sink),
        ):
            if value is not None:
                query = query.where(column == value)
        if before_id:
            query = query.where(deliveries.c.id < before_id)
        query = query.order_by(deliveries.c.id.desc()).limit(limit)
        return await self.database.read(
            lambda conn: [Delivery.from_row(r) for r in conn.execute(query).mappings()]
        )

    async def endpoints(self, tenant: str | None) -> list[Endpoint]:
        query = sa.select(webhook_endpoints)
        if tenant is not None:
            query = query.where(webhook_endpoints.c.tenant == tenant)
        query = query.order_by(webhook_endpoints.c.tenant, webhook_endpoints.c.id).limit(1000)
        return await self.database.read(
            lambda conn: [Endpoint.from_row(r) for r in conn.execute(query).mappings()]
        )

    async def batches(
        self, tenant: str | None, before_id: str | None, limit: int
    ) -> list[BatchRecord]:
        query = sa.select(batches)
        if tenant is not None:
            query = query.where(batches.c.tenant == tenant)
        if before_id:
            query = query.where(batches.c.id < before_id)
        query = query.order_by(batches.c.id.desc()).limit(limit)
        rows = await self.database.read(lambda conn: list(conn.execute(query).mappings()))
        return [BatchRecord.from_row(row) for row in rows]

    async def owner(self, kind: Kind, record_id: str) -> str | None:
        table = _TABLES[kind]
        query = sa.select(table.c.tenant).where(table.c.id == record_id)
        tenant: str | None = await self.database.read(lambda conn: conn.execute(query).scalar())
        return tenant

    async def minutes(self, tenant: str | None, since: int) -> list[MinuteCounts]:
        minute = (jobs.c.finished_at // 60_000).label("minute")
        latency = jobs.c.finished_at - jobs.c.created_at
        succeeded = jobs.c.status == "succeeded"
        query = (
            sa.select(
                minute,
                sa.func.count().filter(succeeded),
                sa.func.count().filter(jobs.c.status.in_(["failed", "expired"])),
                sa.func.count().filter(jobs.c.status == "cancelled"),
                sa.func.avg(latency).filter(succeeded),
                sa.func.max(latency).filter(succeeded),
            )
            .where(jobs.c.finished_at.is_not(None), jobs.c.finished_at >= since, _NOT_ANCHOR)
            .group_by(minute)
            .order_by(minute)
        )
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)

        def counts(row: Any) -> MinuteCounts:
            m, ok, bad, cancelled, avg, worst = row
            average = float(avg) if avg is not None else None
            most = int(worst) if worst is not None else None
            return MinuteCounts(int(m) * 60_000, int(ok), int(bad), int(cancelled), average, most)

        def read(conn: Connection) -> list[MinuteCounts]:
            return [counts(row) for row in conn.execute(query)]

        return await self.database.read(read)

    async def upstream_load(self, tenant: str | None, since: int) -> list[UpstreamLoad]:
        ended = (
            sa.select(
                jobs.c.upstream,
                sa.func.count().filter(jobs.c.status == "succeeded"),
                sa.func.count().filter(jobs.c.status != "succeeded"),
            )
            .where(jobs.c.finished_at.is_not(None), jobs.c.finished_at >= since, _NOT_ANCHOR)
            .group_by(jobs.c.upstream)
        )
        ended, queued, running = _of(ended, jobs, tenant), _queued(tenant), _running(tenant)

        def read(conn: Connection) -> list[UpstreamLoad]:
            names: dict[str, dict[str, Any]] = {}

            def entry(name: str) -> dict[str, Any]:
                return names.setdefault(name, {"queued": 0, "oldest": None, "running": 0,
                                               "ok": 0, "failed": 0})  # fmt: skip

            for name, n, oldest in conn.execute(queued):
                entry(name).update(queued=int(n), oldest=oldest)
            for name, n in conn.execute(running):
                entry(name)["running"] = int(n)
            for name, ok, failed in conn.execute(ended):
                entry(name).update(ok=int(ok), failed=int(failed))
            return [
                UpstreamLoad(name, v["queued"], v["oldest"], v["running"], v["ok"], v["failed"])
                for name, v in sorted(names.items())
            ]

        return await self.database.read(read)
