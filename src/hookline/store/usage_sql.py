"""What a tenant uses: of its limits now (running jobs, the last minute's starts), and of tokens
over days (its budgets, ``GET /v1/usage``). Read-only, for the API; the claim keeps the limits
itself (``hookline.store.claim``).

A day's or a month's tokens are those of the jobs submitted in it: the tenant's jobs are read by
id, whose first characters are the time of submission (``ix_jobs_tenant_id``).
"""

from __future__ import annotations

from collections.abc import Collection

import sqlalchemy as sa
from sqlalchemy import Connection

from hookline.fairness import WINDOW_MS, key_scope, tenant_scope, upstream_scope
from hookline.ids import id_floor
from hookline.jobs import JobStatus, Operation
from hookline.store.base import LimitState, TenantOverview, UsageRow
from hookline.store.claim import _TENANTS_RUNNING, _WINDOW
from hookline.store.schema import jobs

DAY_MS = 86_400_000

_SUBMITTED_SINCE = (
    jobs.c.tenant == sa.bindparam("tenant"),
    jobs.c.id >= sa.bindparam("floor"),
    jobs.c.operation != Operation.BATCH.value,
)

_TOKENS_SPENT = sa.select(
    sa.func.coalesce(
        sa.func.sum(
            sa.func.coalesce(jobs.c.input_tokens, 0) + sa.func.coalesce(jobs.c.output_tokens, 0)
        ),
        0,
    )
).where(*_SUBMITTED_SINCE)

_KEY_TOKENS_SPENT = _TOKENS_SPENT.where(jobs.c.key_id == sa.bindparam("key_id"))

_KEY_RUNNING = sa.select(sa.func.count()).where(
    jobs.c.status == JobStatus.RUNNING.value, jobs.c.key_id == sa.bindparam("key_id")
)

_DAY = sa.cast(jobs.c.created_at / DAY_MS, sa.BigInteger).label("day")
_BY_DAY_AND_MODEL = (
    sa.select(
        _DAY,
        jobs.c.model,
        sa.func.count(),
        sa.func.sum(sa.case((jobs.c.status == JobStatus.SUCCEEDED.value, 1), else_=0)),
        sa.func.coalesce(sa.func.sum(jobs.c.input_tokens), 0),
        sa.func.coalesce(sa.func.sum(jobs.c.output_tokens), 0),
    )
    .where(*_SUBMITTED_SINCE)
    .group_by(_DAY, jobs.c.model)
    .order_by(_DAY, jobs.c.model)
)


def limit_state(
    conn: Connection, tenant: str, upstreams: Collection[str], now: int, key_id: str | None = None
) -> LimitState:
    """The tenant's running jobs, and the last minute's starts of it and of ``upstreams``; with
    ``key_id``, the key's running jobs and starts too."""
    rows = conn.execute(_TENANTS_RUNNING, {"tenants": [tenant]}).all()
    running = int(rows[0][1]) if rows else 0
    scopes = [tenant_scope(tenant), *(upstream_scope(u) for u in upstreams)]
    key_running = 0
    if key_id is not None:
        scopes.append(key_scope(key_id))
        key_running = int(conn.execute(_KEY_RUNNING, {"key_id": key_id}).scalar_one())
    window = {
        str(scope): (int(count), int(tokens), int(oldest))
        for scope, count, tokens, oldest in conn.execute(
            _WINDOW, {"scopes": scopes, "since": now - WINDOW_MS}
        )
    }
    return LimitState(running, window, key_running)


def tokens_spent(conn: Connection, tenant: str, since: int, key_id: str | None = None) -> int:
    """Tokens (input + output) of the tenant's jobs submitted since ``since`` (with ``key_id``:
    of those the key submitted)."""
    params = {"tenant": tenant, "floor": id_floor("job", since)}
    if key_id is not None:
        return int(conn.execute(_KEY_TOKENS_SPENT, {**params, "key_id": key_id}).scalar_one())
    return int(conn.execute(_TOKENS_SPENT, params).scalar_one())


def usage_by_day(conn: Connection, tenant: str, since: int) -> list[UsageRow]:
    """The tenant's jobs and tokens per UTC day and model, of the jobs submitted since ``since``."""
    params = {"tenant": tenant, "floor": id_floor("job", since)}
    return [
        UsageRow(int(day) * DAY_MS, str(model), int(n), int(done), int(given), int(made))
        for day, model, n, done, given, made in conn.execute(_BY_DAY_AND_MODEL, params)
    ]


_ACTIVE_BY_TENANT = (
    sa.select(jobs.c.tenant, jobs.c.status, sa.func.count())
    .where(
        jobs.c.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
        jobs.c.operation != Operation.BATCH.value,
    )
    .group_by(jobs.c.tenant, jobs.c.status)
)

_SPENT_BY_TENANT = (
    sa.select(
        jobs.c.tenant,
        sa.func.sum(
            sa.case((jobs.c.id >= sa.bindparam("day_floor"), 1), else_=0)
            * (sa.func.coalesce(jobs.c.input_tokens, 0) + sa.func.coalesce(jobs.c.output_tokens, 0))
        ),
        sa.func.sum(
            sa.func.coalesce(jobs.c.input_tokens, 0) + sa.func.coalesce(jobs.c.output_tokens, 0)
        ),
    )
    .where(jobs.c.id >= sa.bindparam("month_floor"), jobs.c.operation != Operation.BATCH.value)
    .group_by(jobs.c.tenant)
)


def tenants_overview(conn: Connection, day: int, month: int) -> list[TenantOverview]:
    """Every tenant with jobs queued or running, or submitted since ``month``: those jobs, and
    the tokens of the jobs submitted since ``day`` and since ``month``."""
    found: dict[str, dict[str, int]] = {}
    for tenant, status, count in conn.execute(_ACTIVE_BY_TENANT):
        found.setdefault(str(tenant), {})[str(status)] = int(count)
    params = {"day_floor": id_floor("job", day), "month_floor": id_floor("job", month)}
    for tenant, today, this_month in conn.execute(_SPENT_BY_TENANT, params):
        entry = found.setdefault(str(tenant), {})
        entry["today"], entry["month"] = int(today or 0), int(this_month or 0)
    return [
        TenantOverview(
            tenant,
            queued=entry.get(JobStatus.QUEUED.value, 0),
            running=entry.get(JobStatus.RUNNING.value, 0),
            tokens_today=entry.get("today", 0),
            tokens_this_month=entry.get("month", 0),
        )
        for tenant, entry in sorted(found.items())
    ]
