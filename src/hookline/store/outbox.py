"""The transactional outbox: webhook and data sink messages written in the same transaction as the
events they report, so a message exists exactly when its event does."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from hookline.deliveries import (
    DEFAULT_JOB_EVENTS,
    NO_SINKS,
    DeliveryStatus,
    Endpoint,
    SinkRoutes,
    matches,
    message_body,
)
from hookline.events import Event, EventType
from hookline.ids import new_id
from hookline.jobs import Job, iso
from hookline.responses import webhook_message
from hookline.store.schema import deliveries, webhook_endpoints

PENDING = DeliveryStatus.PENDING.value  # every message starts so
DELTA_INTERVAL_MS = 500
ENDPOINT_DISABLED = "endpoint.disabled"
# A reported event: the event, the job when its state is at hand, and the job's own webhook.
Reported = tuple[Event, Job | None, dict[str, Any] | None]


def order_key(
    endpoint_id: str | None, url: str, job_id: str | None, sink: str | None = None
) -> str:
    """A message's queue: its destination (an endpoint, a job's own URL, a sink) and its job."""
    if sink is not None:
        destination = SINK_PREFIX + sink
    else:
        destination = endpoint_id or "url_" + hashlib.sha256(url.encode()).hexdigest()[:24]
    return f"{destination}|{job_id or ''}"


SINK_PREFIX = "sink:"  # a sink's destination in order keys, and its messages' url
SINK_TEST_EVENT = "sink.test"  # hookline sinks test


_ENDPOINTS = sa.select(
    webhook_endpoints.c.id,
    webhook_endpoints.c.tenant,
    webhook_endpoints.c.url,
    webhook_endpoints.c.events,
)
_ENDPOINTS_OF_TENANTS = _ENDPOINTS.where(
    webhook_endpoints.c.tenant.in_(sa.bindparam("tenants", expanding=True))
)
# Looked up with every job event: one tenant's, the common case, without expanding a list.
_ENDPOINTS_OF_TENANT = _ENDPOINTS.where(webhook_endpoints.c.tenant == sa.bindparam("tenant"))


def endpoints_by_tenant(conn: Connection, tenants: set[str]) -> dict[str, list[Any]]:
    """The registered endpoints of these tenants; a tenant without any is absent."""
    if not tenants:
        return {}
    if len(tenants) == 1:
        [tenant] = tenants
        rows = conn.execute(_ENDPOINTS_OF_TENANT, {"tenant": tenant}).all()
        return {tenant: list(rows)} if rows else {}
    endpoints: defaultdict[str, list[Any]] = defaultdict(list)
    for endpoint in conn.execute(_ENDPOINTS_OF_TENANTS, {"tenants": list(tenants)}):
        endpoints[endpoint.tenant].append(endpoint)
    return dict(endpoints)


def enqueue_deliveries(
    conn: Connection,
    reported: Sequence[Reported],
    now: int,
    endpoints: dict[str, list[Any]] | None = None,
    sinks: SinkRoutes = NO_SINKS,
) -> int:
    """Insert one message per (event, subscribed destination): webhook endpoints, the job's own
    webhook, the data sinks that take it (``sinks``). Returns how many. ``endpoints`` (from
    :func:`endpoints_by_tenant`) saves the query when the caller has them."""
    if not reported:
        return 0
    if endpoints is None:
        endpoints = endpoints_by_tenant(conn, {event.tenant for event, _, _ in reported})
    rows: list[dict[str, Any]] = []
    written = 0
    for event, job, webhook in reported:
        subscribed = endpoints.get(event.tenant, ())
        # A response's job ending is also reported as OpenAI's response.* event, to the
        # endpoints that subscribe to it (a response has no webhook of its own).
        response = webhook_message(event, job) if subscribed else None
        if response is not None:
            kind, response_body = response
            rows += [
                _message(event, job, ep.id, ep.url, kind, response_body, now, now)
                for ep in subscribed
                if matches(ep.events, kind)
            ]
        destinations: list[tuple[str | None, str, str | None]] = [
            (ep.id, ep.url, None) for ep in subscribed if matches(ep.events, event.type)
        ]
        if webhook:
            url = webhook.get("url")
            if url and matches(webhook.get("events") or DEFAULT_JOB_EVENTS, event.type):
                destinations.append((None, url, None))
        if sinks:
            named = (webhook.get("sinks") or ()) if webhook else ()
            for name in sinks.destinations(event.tenant, event.type.value, named):
                destinations.append((None, SINK_PREFIX + name, name))
        if not destinations:
            continue
        body = message_body(event, job)
        for endpoint_id, url, sink in destinations:
            due = now
            if event.type is EventType.OUTPUT_DELTA:
                key = order_key(endpoint_id, url, event.job_id, sink)
                throttled = _throttle_delta(conn, key, body, now)
                if throttled is None:
                    continue  # merged into a message not sent yet
                due = throttled
            message = _message(event, job, endpoint_id, url, event.type.value, body, due, now, sink)
            if event.type is EventType.OUTPUT_DELTA:
                conn.execute(sa.insert(deliveries), [message])  # the next delta must see it
                written += 1
            else:
                rows.append(message)
    if rows:
        conn.execute(sa.insert(deliveries), rows)
    return written + len(rows)


def _message(
    event: Event,
    job: Job | None,
    endpoint_id: str | None,
    url: str,
    event_type: str,
    body: dict[str, Any],
    due: int,
    now: int,
    sink: str | None = None,
) -> dict[str, Any]:
    """The outbox row of one message reporting ``event`` to one destination, due at ``due``."""
    return {
        "id": new_id("msg"),
        "tenant": event.tenant,
        "endpoint_id": endpoint_id,
        "url": url,
        "job_id": event.job_id,
        "event_type": event_type,
        "payload": body,
        "order_key": order_key(endpoint_id, url, event.job_id, sink),
        "seq": event.seq,
        "status": PENDING,
        "attempts": 0,
        "next_attempt_at": due,
        "created_at": now,
        "updated_at": now,
        "traceparent": job.traceparent if job is not None else None,
        "sink": sink,
    }


def _throttle_delta(conn: Connection, key: str, body: dict[str, Any], now: int) -> int | None:
    """At most one ``job.output.delta`` message per destination and job every
    ``DELTA_INTERVAL_MS``, carrying every delta since the last: a delta joins the newest message of
    its queue while that one has not been tried yet; otherwise it is due one interval after it
    (after it was sent, if it went later than due; see also :func:`space_deltas_after_sends`).
    Returns when the new message is due, or None when the delta was merged."""
    last = conn.execute(
        sa.select(
            deliveries.c.id,
            deliveries.c.event_type,
            deliveries.c.status,
            deliveries.c.attempts,
            deliveries.c.lease_token,
            deliveries.c.payload,
            deliveries.c.next_attempt_at,
            deliveries.c.updated_at,
        )
        .where(deliveries.c.order_key == key)
        .order_by(deliveries.c.seq.desc(), deliveries.c.id.desc())
        .limit(1)
    ).first()
    if last is None or last.event_type != EventType.OUTPUT_DELTA.value:
        return now
    data, previous = body["data"], last.payload["data"]
    mergeable = (
        last.status == PENDING
        and last.attempts == 0
        and last.lease_token is None
        and previous.get("attempt") == data.get("attempt")
        and previous.get("index") == data.get("index")
    )
    # A message already tried was sent before its outcome was recorded (updated_at), which may
    # be well after it was due.
    after = max(int(last.next_attempt_at), int(last.updated_at) if last.attempts else 0)
    if not mergeable:
        return max(now, after + DELTA_INTERVAL_MS)
    text = previous["text"] + data["text"]
    merged = {**last.payload, "data": {**previous, "text": text, "last_seq": data["seq"]}}
    merged_into = conn.execute(
        sa.update(deliveries)
        .where(deliveries.c.id == last.id, deliveries.c.lease_token.is_(None))
        .values(payload=merged, updated_at=now)
    ).rowcount
    # Claimed by a sender in the meantime (PostgreSQL): the delta goes in a message of its own.
    return None if merged_into else max(now, after + DELTA_INTERVAL_MS)


def space_deltas_after_sends(conn: Connection, sent: dict[str, int]) -> None:
    """``sent``: order key -> when the receiver answered a ``job.output.delta`` message of it.
    The next delta message of each is due no sooner than an interval after that: its due time was
    set from the sent one's due time, and that one may have gone out late."""
    for key, at in sent.items():
        conn.execute(
            sa.update(deliveries)
            .where(
                deliveries.c.order_key == key,
                deliveries.c.status == PENDING,
                deliveries.c.event_type == EventType.OUTPUT_DELTA.value,
                deliveries.c.next_attempt_at < at + DELTA_INTERVAL_MS,
            )
            .values(next_attempt_at=at + DELTA_INTERVAL_MS)
        )


def report_disabled(conn: Connection, endpoint: Endpoint, now: int) -> None:
    """Record ``endpoint.disabled`` as a message to the tenant's endpoints that subscribe to it."""
    others = conn.execute(
        sa.select(
            webhook_endpoints.c.id, webhook_endpoints.c.url, webhook_endpoints.c.events
        ).where(
            webhook_endpoints.c.tenant == endpoint.tenant, webhook_endpoints.c.id != endpoint.id
        )
    ).all()
    body = {"type": ENDPOINT_DISABLED, "timestamp": iso(now), "data": endpoint.as_json()}
    rows = [
        {
            "id": new_id("msg"),
            "tenant": endpoint.tenant,
            "endpoint_id": other.id,
            "url": other.url,
            "job_id": None,
            "event_type": ENDPOINT_DISABLED,
            "payload": body,
            "order_key": order_key(other.id, other.url, None),
            "status": PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        }
        for other in others
        if ENDPOINT_DISABLED in other.events or "*" in other.events
    ]
    if rows:
        conn.execute(sa.insert(deliveries), rows)
