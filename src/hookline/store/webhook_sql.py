"""Webhook storage: endpoints, secrets, and the sender's and the API's side of the delivery
outbox (which :mod:`hookline.store.outbox` fills). Same Database as the jobs."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql

from hookline.deliveries import Attempt, AttemptOutcome, Delivery, Endpoint
from hookline.events import EventType
from hookline.ids import new_id
from hookline.store.database import Database, chosen_once
from hookline.store.outbox import (
    FAILED,
    PENDING,
    SUCCEEDED,
    report_disabled,
    space_deltas_after_sends,
)
from hookline.store.schema import deliveries, delivery_attempts, webhook_endpoints, webhook_secrets
from hookline.webhooks import new_secret


def _claim_statement(busy: Collection[str]) -> sa.Update:
    """Lease the due heads of their order_key (bind ``now``, ``limit``, ``token``, ``expires``):
    one statement, which picks and leases together."""
    if not busy:
        return _CLAIM_ANYWHERE
    due = _build_due().where(
        sa.not_(sa.or_(*(deliveries.c.order_key.startswith(f"{d}|") for d in busy)))
    )
    return _leasing(due)


def _build_due() -> sa.Select[tuple[str]]:
    """Heads of their order_key that are due, not leased, whose endpoint is enabled."""
    now = sa.bindparam("now", type_=sa.BigInteger)
    earlier = deliveries.alias("earlier")
    query = (
        sa.select(deliveries.c.id)
        .select_from(
            deliveries.outerjoin(
                webhook_endpoints, webhook_endpoints.c.id == deliveries.c.endpoint_id
            )
        )
        .where(
            deliveries.c.status == sa.literal_column("'pending'"),
            deliveries.c.next_attempt_at <= now,
            sa.or_(deliveries.c.lease_expires_at.is_(None), deliveries.c.lease_expires_at < now),
            sa.or_(deliveries.c.endpoint_id.is_(None), webhook_endpoints.c.enabled.is_(True)),
            ~sa.exists().where(
                earlier.c.order_key == deliveries.c.order_key,
                earlier.c.status == PENDING,
                sa.tuple_(earlier.c.seq, earlier.c.id)
                < sa.tuple_(deliveries.c.seq, deliveries.c.id),
            ),
        )
        .order_by(deliveries.c.next_attempt_at)  # the index's order: the scan stops at the limit
        # Bound, not rendered into the text: one prepared statement on PostgreSQL, whatever the
        # room the sender claims for (20 sizes in one benchmark run, each prepared per connection).
        .limit(sa.bindparam("limit", type_=sa.Integer))
        .with_for_update(skip_locked=True, of=deliveries)
    )
    return query


def _leasing(due: sa.Select[tuple[str]]) -> sa.Update:
    return (
        sa.update(deliveries)
        .where(deliveries.c.id.in_(chosen_once(due, "due")))
        .values(
            lease_token=sa.bindparam("token", type_=sa.String),
            lease_expires_at=sa.bindparam("expires", type_=sa.BigInteger),
        )
        .returning(*deliveries.c)
    )


# Built once: constructing these statements cost more than running them.
_CLAIM_ANYWHERE = _leasing(_build_due())


def _secret_owner(endpoint_id: str | None) -> sa.ColumnElement[bool]:
    """Secrets of one endpoint, or (None) the tenant's default secrets."""
    if endpoint_id is None:
        return webhook_secrets.c.endpoint_id.is_(None)
    return webhook_secrets.c.endpoint_id == endpoint_id


class DeliveryStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    # --- endpoints

    async def create_endpoint(self, tenant: str, fields: dict[str, Any], now: int) -> Endpoint:
        endpoint_id = new_id("ep")
        row = {
            "id": endpoint_id,
            "tenant": tenant,
            "enabled": True,
            "disabled_reason": None,
            "created_at": now,
            "updated_at": now,
            "last_success_at": None,
            "failing_since": None,
            "description": None,
            "rate_limit_per_second": None,
            **fields,
        }

        def create(conn: Connection) -> Endpoint:
            conn.execute(sa.insert(webhook_endpoints).values(**row))
            conn.execute(
                sa.insert(webhook_secrets).values(
                    id=new_id("whs"),
                    tenant=tenant,
                    endpoint_id=endpoint_id,
                    secret=new_secret(),
                    created_at=now,
                )
            )
            return Endpoint.from_row(row)

        return await self.database.write(create)

    async def list_endpoints(self, tenant: str) -> list[Endpoint]:
        query = (
            sa.select(webhook_endpoints)
            .where(webhook_endpoints.c.tenant == tenant)
            .order_by(webhook_endpoints.c.id)
        )
        return await self.database.read(
            lambda conn: [Endpoint.from_row(r) for r in conn.execute(query).mappings()]
        )

    async def get_endpoint(self, tenant: str, endpoint_id: str) -> Endpoint | None:
        query = sa.select(webhook_endpoints).where(
            webhook_endpoints.c.tenant == tenant, webhook_endpoints.c.id == endpoint_id
        )

        def fetch(conn: Connection) -> Endpoint | None:
            row = conn.execute(query).mappings().first()
            return Endpoint.from_row(row) if row else None

        return await self.database.read(fetch)

    async def update_endpoint(
        self, tenant: str, endpoint_id: str, fields: dict[str, Any], now: int
    ) -> Endpoint | None:
        statement = (
            sa.update(webhook_endpoints)
            .where(webhook_endpoints.c.tenant == tenant, webhook_endpoints.c.id == endpoint_id)
            .values(updated_at=now, **fields)
            .returning(*webhook_endpoints.c)
        )

        def update(conn: Connection) -> Endpoint | None:
            row = conn.execute(statement).mappings().first()
            return Endpoint.from_row(row) if row else None

        return await self.database.write(update)

    async def delete_endpoint(self, tenant: str, endpoint_id: str, now: int) -> bool:
        def delete(conn: Connection) -> bool:
            gone = conn.execute(
                sa.delete(webhook_endpoints).where(
                    webhook_endpoints.c.tenant == tenant, webhook_endpoints.c.id == endpoint_id
                )
            ).rowcount
            if not gone:
                return False
            conn.execute(
                sa.delete(webhook_secrets).where(webhook_secrets.c.endpoint_id == endpoint_id)
            )
            conn.execute(
                sa.update(deliveries)
                .where(deliveries.c.endpoint_id == endpoint_id, deliveries.c.status == PENDING)
                .values(status=FAILED, last_error="endpoint deleted", updated_at=now)
            )
            return True

        return await self.database.write(delete)

    # --- secrets

    async def signing_secrets(self, tenant: str, endpoint_id: str | None, now: int) -> list[str]:
        """The secrets that sign for an endpoint (or the tenant's default), newest first;
        the tenant's default secret is created on first use."""

        def fetch(conn: Connection) -> list[str]:
            owner = _secret_owner(endpoint_id)
            query = (
                sa.select(webhook_secrets.c.secret)
                .where(
                    webhook_secrets.c.tenant == tenant,
                    owner,
                    sa.or_(
                        webhook_secrets.c.retires_at.is_(None), webhook_secrets.c.retires_at > now
                    ),
                )
                .order_by(webhook_secrets.c.created_at.desc(), webhook_secrets.c.id.desc())
            )
            return list(conn.execute(query).scalars())

        def fetch_or_create(conn: Connection) -> list[str]:
            found = fetch(conn)
            if found or endpoint_id is not None:
                return found
            secret = new_secret()
            conn.execute(
                sa.insert(webhook_secrets).values(
                    id=new_id("whs"), tenant=tenant, endpoint_id=None, secret=secret, created_at=now
                )
            )
            return [secret]

        found = await self.database.read(fetch)  # a read: the common case needs no write lock
        if found or endpoint_id is not None:
            return found
        return await self.database.write(fetch_or_create)

    async def rotate_secret(
        self, tenant: str, endpoint_id: str | None, overlap_ms: int, now: int
    ) -> str:
        """A new current secret; the previous ones keep signing for ``overlap_ms``."""

        def rotate(conn: Connection) -> str:
            owner = _secret_owner(endpoint_id)
            conn.execute(
                sa.update(webhook_secrets)
                .where(
                    webhook_secrets.c.tenant == tenant,
                    owner,
                    sa.or_(
                        webhook_secrets.c.retires_at.is_(None),
                        webhook_secrets.c.retires_at > now + overlap_ms,
                    ),
                )
                .values(retires_at=now + overlap_ms)
            )
            secret = new_secret()
            conn.execute(
                sa.insert(webhook_secrets).values(
                    id=new_id("whs"),
                    tenant=tenant,
                    endpoint_id=endpoint_id,
                    secret=secret,
                    created_at=now,
                )
            )
            return secret

        return await self.database.write(rotate)

    # --- the sender's side

    async def claim_due(
        self, now: int, limit: int, lease_token: str, lease_expires_at: int, busy: Collection[str]
    ) -> list[Delivery]:
        claim = ClaimRequest(now, limit, lease_token, lease_expires_at, busy)
        return await self.database.write(lambda conn: _claim(conn, claim), bulk=True)

    async def release(self, delivery_ids: Collection[str], lease_token: str) -> None:
        """Give back claimed messages unsent."""
        statement = (
            sa.update(deliveries)
            .where(deliveries.c.id.in_(list(delivery_ids)), deliveries.c.lease_token == lease_token)
            .values(lease_token=None, lease_expires_at=None)
        )
        await self.database.write(lambda conn: conn.execute(statement), bulk=True)

    async def record_attempts(
        self, results: list[RecordedAttempt], then_claim: ClaimRequest | None = None
    ) -> tuple[list[bool], list[Delivery]]:
        """Log attempts and apply their outcomes, all in one transaction. For each: False if the
        lease was lost meanwhile (someone else owns the message now). With ``then_claim``, the
        same transaction claims the next messages: under load the sender spends one commit, not
        two, per batch of sends."""

        def record(conn: Connection) -> tuple[list[bool], list[Delivery]]:
            held = _record_all(conn, results) if results else []
            return held, _claim(conn, then_claim) if then_claim else []

        return await self.database.write(record, bulk=True)

    async def failing_since(self, endpoint_id: str) -> int | None:
        query = sa.select(webhook_endpoints.c.failing_since).where(
            webhook_endpoints.c.id == endpoint_id
        )
        value: int | None = await self.database.read(
            lambda conn: conn.execute(query).scalar_one_or_none()
        )
        return value

    # --- the API's side

    async def list_deliveries(
        self,
        tenant: str,
        *,
        endpoint_id: str | None = None,
        job_id: str | None = None,
        status: str | None = None,
        since: int | None = None,
        until: int | None = None,
        before_id: str | None = None,
        limit: int = 50,
    ) -> list[Delivery]:
        query = sa.select(deliveries).where(deliveries.c.tenant == tenant)
        for column, value in (
            (deliveries.c.endpoint_id, endpoint_id),
            (deliveries.c.job_id, job_id),
            (deliveries.c.status, status),
        ):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(deliveries.c.created_at >= since)
        if until is not None:
            query = query.where(deliveries.c.created_at < until)
        if before_id is not None:
            query = query.where(deliveries.c.id < before_id)
        query = query.order_by(deliveries.c.id.desc()).limit(limit)
        return await self.database.read(
            lambda conn: [Delivery.from_row(r) for r in conn.execute(query).mappings()]
        )

    async def get_delivery(
        self, tenant: str, delivery_id: str
    ) -> tuple[Delivery, list[Attempt]] | None:
        def fetch(conn: Connection) -> tuple[Delivery, list[Attempt]] | None:
            row = (
                conn.execute(
                    sa.select(deliveries).where(
                        deliveries.c.tenant == tenant, deliveries.c.id == delivery_id
                    )
                )
                .mappings()
                .first()
            )
            if row is None:
                return None
            attempts = conn.execute(
                sa.select(delivery_attempts)
                .where(delivery_attempts.c.delivery_id == delivery_id)
                .order_by(delivery_attempts.c.id)
            ).mappings()
            return Delivery.from_row(row), [Attempt.from_row(a) for a in attempts]

        return await self.database.read(fetch)

    async def resend(
        self,
        tenant: str,
        now: int,
        *,
        delivery_id: str | None = None,
        endpoint_id: str | None = None,
        since: int | None = None,
    ) -> int:
        """Queue failed (or, for one delivery, any finished) messages to be sent again now."""
        statement = sa.update(deliveries).where(deliveries.c.tenant == tenant)
        if delivery_id is not None:
            statement = statement.where(deliveries.c.id == delivery_id)
        else:
            statement = statement.where(
                deliveries.c.endpoint_id == endpoint_id,
                deliveries.c.status == FAILED,
                deliveries.c.created_at >= (since or 0),
            )
        statement = statement.values(
            status=PENDING,
            next_attempt_at=now,
            lease_token=None,
            lease_expires_at=None,
            updated_at=now,
        )
        return await self.database.write(lambda conn: conn.execute(statement).rowcount)

    async def delete_settled(self, before: int, limit: int) -> int:
        """Delete up to ``limit`` messages settled (sent or failed for good) before ``before``,
        with their attempt log; the number deleted. Call again while it returns ``limit``."""
        oldest = (
            sa.select(deliveries.c.id)
            # A literal status, so that the partial index ix_deliveries_settled applies.
            .where(deliveries.c.status != sa.literal_column("'pending'"))
            .where(deliveries.c.updated_at < before)
            .order_by(deliveries.c.updated_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )

        def delete(conn: Connection) -> int:
            ids = list(conn.execute(oldest).scalars())
            if ids:
                attempts = delivery_attempts.c.delivery_id
                conn.execute(sa.delete(delivery_attempts).where(attempts.in_(ids)))
                conn.execute(sa.delete(deliveries).where(deliveries.c.id.in_(ids)))
            return len(ids)

        return await self.database.write(delete)


def _update_endpoint_health(
    conn: Connection, endpoint_id: str, outcome: AttemptOutcome, now: int
) -> None:
    table = webhook_endpoints
    if outcome.succeeded:
        values: dict[str, Any] = {"last_success_at": now, "failing_since": None}
    else:
        values = {"failing_since": sa.func.coalesce(table.c.failing_since, now)}
    if not outcome.disable_endpoint:
        conn.execute(sa.update(table).where(table.c.id == endpoint_id).values(**values))
        return
    values.update(enabled=False, disabled_reason=outcome.disable_endpoint, updated_at=now)
    row = (
        conn.execute(
            sa.update(table)
            .where(table.c.id == endpoint_id, table.c.enabled.is_(True))
            .values(**values)
            .returning(*table.c)
        )
        .mappings()
        .first()
    )
    if row is not None:
        report_disabled(conn, Endpoint.from_row(row), now)


RecordedAttempt = tuple[Delivery, str, AttemptOutcome, int]


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimRequest:
    """Claim up to ``limit`` due messages under ``lease_token``, none for a ``busy`` destination."""

    now: int
    limit: int
    lease_token: str
    lease_expires_at: int
    busy: Collection[str]


def _claim(conn: Connection, claim: ClaimRequest) -> list[Delivery]:
    if claim.limit <= 0:
        return []
    params = {
        "now": claim.now,
        "limit": claim.limit,
        "token": claim.lease_token,
        "expires": claim.lease_expires_at,
    }
    rows = conn.execute(_claim_statement(claim.busy), params).mappings()
    return sorted((Delivery.from_row(r) for r in rows), key=lambda d: d.id)


def _success_update(chosen: sa.ColumnElement[bool]) -> sa.Update:
    return (
        sa.update(deliveries)
        .where(chosen, deliveries.c.lease_token == sa.bindparam("token"))
        .values(
            status=SUCCEEDED,
            attempts=deliveries.c.attempts + 1,
            lease_token=None,
            lease_expires_at=None,
            updated_at=sa.bindparam("now", type_=sa.BigInteger),
            last_status_code=sa.bindparam("code", type_=sa.Integer),
            last_error=None,
        )
        .returning(deliveries.c.id)
    )


# Successes, the common case, are applied a group at a time (one statement for every message of
# one lease and status code); RETURNING says which leases were still held. On PostgreSQL the ids
# go as one array: an expanding IN is rendered anew for every batch, a cast per id (~4 µs each),
# and each batch size is another statement for the server to prepare.
_apply_success = {
    "sqlite": _success_update(deliveries.c.id.in_(sa.bindparam("ids", expanding=True))),
    "postgresql": _success_update(
        deliveries.c.id == sa.any_(sa.bindparam("ids", type_=postgresql.ARRAY(sa.String)))
    ),
}

_apply_outcome = (
    sa.update(deliveries)
    .where(
        deliveries.c.id == sa.bindparam("b_id"),
        deliveries.c.lease_token == sa.bindparam("b_token"),
    )
    .values(
        status=sa.bindparam("b_status"),
        attempts=deliveries.c.attempts + 1,
        next_attempt_at=sa.bindparam("b_next_at"),
        lease_token=None,
        lease_expires_at=None,
        updated_at=sa.bindparam("b_now"),
        last_status_code=sa.bindparam("b_code"),
        last_error=sa.bindparam("b_error"),
    )
    .returning(deliveries.c.id)
)
_insert_attempt = sa.insert(delivery_attempts)


def _record_all(conn: Connection, results: list[RecordedAttempt]) -> list[bool]:
    """Apply a batch of outcomes with a few statements for the whole batch, not a few per
    message: recording attempts is the sender's main database cost."""
    successes: dict[tuple[str, int | None], list[RecordedAttempt]] = {}
    held: set[str] = set()
    for result in results:
        delivery, token, outcome, now = result
        if outcome.succeeded:
            successes.setdefault((token, outcome.status_code), []).append(result)
        else:  # rare: one statement each
            params = _outcome_params(*result)
            held.update(conn.execute(_apply_outcome, params).scalars())
    for (token, code), group in successes.items():
        params = {
            "ids": [delivery.id for delivery, *_ in group],
            "token": token,
            "now": max(now for *_, now in group),
            "code": code,
        }
        held.update(conn.execute(_apply_success[conn.dialect.name], params).scalars())
    kept = [r for r in results if r[0].id in held]
    sent_deltas: dict[str, int] = {}
    for delivery, _, outcome, now in kept:
        if outcome.succeeded and delivery.event_type == EventType.OUTPUT_DELTA.value:
            sent_deltas[delivery.order_key] = max(now, sent_deltas.get(delivery.order_key, 0))
    if sent_deltas:  # rare: only endpoints that asked for output deltas get them
        space_deltas_after_sends(conn, sent_deltas)
    if kept:
        conn.execute(
            _insert_attempt,
            [
                {
                    "delivery_id": delivery.id,
                    "attempted_at": now,
                    "status_code": outcome.status_code,
                    "latency_ms": outcome.latency_ms,
                    "error": outcome.error,
                    "response_excerpt": outcome.response_excerpt,
                }
                for delivery, _, outcome, now in kept
            ],
        )
        # Endpoint health: the last outcome per endpoint decides (successes clear failing_since).
        last: dict[str, tuple[AttemptOutcome, int]] = {}
        for delivery, _, outcome, now in kept:
            if delivery.endpoint_id is not None:
                previous = last.get(delivery.endpoint_id)
                if previous is None or not previous[0].disable_endpoint:
                    last[delivery.endpoint_id] = (outcome, now)
        for endpoint_id, (outcome, now) in last.items():
            _update_endpoint_health(conn, endpoint_id, outcome, now)
    return [r[0].id in held for r in results]


def _outcome_params(
    delivery: Delivery, token: str, outcome: AttemptOutcome, now: int
) -> dict[str, Any]:
    if outcome.succeeded:
        status, next_at = SUCCEEDED, delivery.next_attempt_at
    elif outcome.next_attempt_at is None:
        status, next_at = FAILED, delivery.next_attempt_at
    else:
        status, next_at = PENDING, outcome.next_attempt_at
    return {
        "b_id": delivery.id,
        "b_token": token,
        "b_status": status,
        "b_next_at": next_at,
        "b_now": now,
        "b_code": outcome.status_code,
        "b_error": outcome.error,
    }
