"""The SQL implementation of :class:`~hookline.store.base_deliveries.Deliveries`: endpoints,
their secrets, and the delivery outbox as the API reads and replays it. The sender's claims and
recordings are in :mod:`hookline.store.outbox_sender`; the job store writes the messages
(:mod:`hookline.store.outbox`). Same Database as the jobs."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from hookline.deliveries import Attempt, Delivery, DeliveryStatus, Endpoint, new_secret, sources_for
from hookline.ids import new_id
from hookline.jobs import iso
from hookline.store.base_deliveries import ClaimRequest, Deliveries, RecordedAttempt
from hookline.store.database import Database
from hookline.store.outbox import order_key
from hookline.store.outbox_sender import claim_messages, record_outcomes
from hookline.store.schema import deliveries, delivery_attempts, webhook_endpoints, webhook_secrets

TEST_EVENT = "endpoint.test"


def _secret_owner(endpoint_id: str | None) -> sa.ColumnElement[bool]:
    """Secrets of one endpoint, or (None) the tenant's default secrets."""
    if endpoint_id is None:
        return webhook_secrets.c.endpoint_id.is_(None)
    return webhook_secrets.c.endpoint_id == endpoint_id


class SQLDeliveries(Deliveries):
    def __init__(self, database: Database) -> None:
        self.database = database
        self.capabilities = database.capabilities

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
                .where(
                    deliveries.c.endpoint_id == endpoint_id,
                    deliveries.c.status.in_(_values(sources_for(DeliveryStatus.FAILED))),
                )
                .values(
                    status=DeliveryStatus.FAILED.value,
                    last_error="endpoint deleted",
                    updated_at=now,
                )
            )
            return True

        return await self.database.write(delete)

    # --- secrets

    async def signing_secrets(self, tenant: str, endpoint_id: str | None, now: int) -> list[str]:
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
        return await self.database.write(lambda conn: claim_messages(conn, claim), bulk=True)

    async def release(self, delivery_ids: Collection[str], lease_token: str) -> None:
        statement = (
            sa.update(deliveries)
            .where(deliveries.c.id.in_(list(delivery_ids)), deliveries.c.lease_token == lease_token)
            .values(lease_token=None, lease_expires_at=None)
        )
        await self.database.write(lambda conn: conn.execute(statement), bulk=True)

    async def record_attempts(
        self, results: list[RecordedAttempt], then_claim: ClaimRequest | None = None
    ) -> tuple[list[bool], list[Delivery]]:
        # Claiming in the recording's transaction: under load the sender spends one commit, not
        # two, per batch of sends.
        def record(conn: Connection) -> tuple[list[bool], list[Delivery]]:
            held = record_outcomes(conn, results) if results else []
            claimed = claim_messages(conn, then_claim) if then_claim else []
            return held, claimed

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
        sink: str | None = None,
    ) -> list[Delivery]:
        query = sa.select(deliveries).where(deliveries.c.tenant == tenant)
        for column, value in (
            (deliveries.c.endpoint_id, endpoint_id),
            (deliveries.c.sink, sink),
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

    async def send_test(self, tenant: str, endpoint_id: str, now: int) -> str | None:
        def write(conn: Connection) -> str | None:
            endpoint = conn.execute(
                sa.select(webhook_endpoints.c.url).where(
                    webhook_endpoints.c.tenant == tenant, webhook_endpoints.c.id == endpoint_id
                )
            ).first()
            if endpoint is None:
                return None
            message_id = new_id("msg")
            data = {"endpoint_id": endpoint_id, "message": "a test event, sent from the dashboard"}
            message = {
                "id": message_id, "tenant": tenant, "endpoint_id": endpoint_id,
                "url": endpoint.url, "job_id": None, "event_type": TEST_EVENT,
                "payload": {"type": TEST_EVENT, "timestamp": iso(now), "data": data},
                "order_key": order_key(endpoint_id, endpoint.url, None),
                "status": DeliveryStatus.PENDING.value, "attempts": 0, "next_attempt_at": now,
                "created_at": now, "updated_at": now,
            }  # fmt: skip
            conn.execute(sa.insert(deliveries).values(**message))
            return message_id

        return await self.database.write(write)

    async def resend(
        self,
        tenant: str,
        now: int,
        *,
        delivery_id: str | None = None,
        endpoint_id: str | None = None,
        since: int | None = None,
    ) -> int:
        statement = sa.update(deliveries).where(
            deliveries.c.tenant == tenant,
            deliveries.c.status.in_(_values(sources_for(DeliveryStatus.PENDING))),
        )
        if delivery_id is not None:
            statement = statement.where(deliveries.c.id == delivery_id)
        else:
            statement = statement.where(
                deliveries.c.endpoint_id == endpoint_id,
                deliveries.c.status == DeliveryStatus.FAILED.value,
                deliveries.c.created_at >= (since or 0),
            )
        statement = statement.values(
            status=DeliveryStatus.PENDING.value,
            next_attempt_at=now,
            lease_token=None,
            lease_expires_at=None,
            updated_at=now,
        )
        return await self.database.write(lambda conn: conn.execute(statement).rowcount)

    async def send_sink_test(self, tenant: str, sink: str, now: int) -> str:
        from hookline.store.outbox import SINK_PREFIX, SINK_TEST_EVENT, order_key

        message_id = new_id("msg")
        body = {"type": SINK_TEST_EVENT, "timestamp": iso(now), "data": {"sink": sink}}
        row = {
            "id": message_id, "tenant": tenant, "endpoint_id": None, "url": SINK_PREFIX + sink,
            "job_id": None, "event_type": SINK_TEST_EVENT, "payload": body,
            "order_key": order_key(None, "", None, sink), "status": DeliveryStatus.PENDING.value,
            "attempts": 0, "next_attempt_at": now, "created_at": now, "updated_at": now,
            "sink": sink,
        }  # fmt: skip
        await self.database.write(lambda conn: conn.execute(sa.insert(deliveries).values(**row)))
        return message_id

    async def resend_sink(
        self, sink: str, now: int, *, tenant: str | None = None, since: int | None = None
    ) -> int:
        statement = sa.update(deliveries).where(
            deliveries.c.sink == sink,
            deliveries.c.status == DeliveryStatus.FAILED.value,
            deliveries.c.created_at >= (since or 0),
        )
        if tenant is not None:
            statement = statement.where(deliveries.c.tenant == tenant)
        statement = statement.values(
            status=DeliveryStatus.PENDING.value,
            next_attempt_at=now,
            lease_token=None,
            lease_expires_at=None,
            updated_at=now,
        )
        return await self.database.write(lambda conn: conn.execute(statement).rowcount)

    async def delete_settled(self, before: int, limit: int) -> int:
        oldest = (
            sa.select(deliveries.c.id)
            # A literal status, so that the partial index ix_deliveries_settled applies.
            .where(deliveries.c.status != sa.literal_column(f"'{DeliveryStatus.PENDING.value}'"))
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


def _values(statuses: Collection[DeliveryStatus]) -> list[str]:
    return sorted(status.value for status in statuses)
