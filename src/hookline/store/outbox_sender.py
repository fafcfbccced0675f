"""The outbox as the webhook sender consumes it, in SQL: claiming the due heads of their
queues under a lease, and recording what came of sending them (for
:class:`~hookline.store.webhook_sql.SQLDeliveries`). Recording attempts is the sender's main
database cost, so it takes a few statements per batch, not a few per message.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql

from hookline.deliveries import AttemptOutcome, Delivery, DeliveryStatus, Endpoint
from hookline.events import EventType
from hookline.store.base_deliveries import ClaimRequest, RecordedAttempt
from hookline.store.database import chosen_once
from hookline.store.outbox import report_disabled, space_deltas_after_sends
from hookline.store.schema import deliveries, delivery_attempts, webhook_endpoints

PENDING = DeliveryStatus.PENDING.value
SUCCEEDED = DeliveryStatus.SUCCEEDED.value
FAILED = DeliveryStatus.FAILED.value


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
            deliveries.c.status == sa.literal_column(f"'{PENDING}'"),
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


def claim_messages(conn: Connection, claim: ClaimRequest) -> list[Delivery]:
    """Lease the due messages ``claim`` asks for (see Deliveries.claim_due)."""
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


def record_outcomes(conn: Connection, results: list[RecordedAttempt]) -> list[bool]:
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
