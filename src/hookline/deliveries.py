"""Delivery records: the outbox rows the webhook sender works through, and what the API shows.

A message is ``pending`` until an attempt succeeds (``succeeded``) or its retry schedule runs out,
its endpoint is disabled or deleted (``failed``: a dead letter); a failed attempt with retries
left keeps it ``pending``; a resend makes a settled message ``pending`` again. The store applies
each change with a conditional UPDATE (on the lease that sent it, or on the statuses allowed by
:data:`ALLOWED_TRANSITIONS`).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import fnmatch
import secrets as _secrets
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from hookline.events import Event, EventType
from hookline.jobs import Job, iso, job_json

T = TypeVar("T")


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


# By value: a lookup here costs a tenth of DeliveryStatus(value), on the sender's claim path.
_STATUSES = {status.value: status for status in DeliveryStatus}

ALLOWED_TRANSITIONS: Mapping[DeliveryStatus, frozenset[DeliveryStatus]] = {
    # Retried (stays pending), sent, or given up on.
    DeliveryStatus.PENDING: frozenset(DeliveryStatus),
    # Resent on request.
    DeliveryStatus.SUCCEEDED: frozenset({DeliveryStatus.PENDING}),
    DeliveryStatus.FAILED: frozenset({DeliveryStatus.PENDING}),
}


def sources_for(new: DeliveryStatus) -> frozenset[DeliveryStatus]:
    """Every status from which a message may move to ``new`` (the WHERE of a conditional
    UPDATE)."""
    return frozenset(s for s, targets in ALLOWED_TRANSITIONS.items() if new in targets)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _from_row(cls: type[T], row: Mapping[Any, Any], **converted: Any) -> T:
    """A record whose fields are named like the row's columns (``converted``: those whose
    column holds another type)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    values = {name: row[name] for name in names}
    values.update(converted)
    return cls(**values)


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    id: str
    tenant: str
    url: str
    description: str | None
    events: list[str]
    enabled: bool
    disabled_reason: str | None
    rate_limit_per_second: float | None
    created_at: int
    updated_at: int
    last_success_at: int | None
    failing_since: int | None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Endpoint:
        return _from_row(cls, row)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "webhook_endpoint",
            "url": self.url,
            "description": self.description,
            "events": self.events,
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "rate_limit_per_second": self.rate_limit_per_second,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "last_success_at": iso(self.last_success_at),
            "failing_since": iso(self.failing_since),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    id: str
    tenant: str
    endpoint_id: str | None
    url: str
    job_id: str | None
    event_type: str
    payload: dict[str, Any]
    order_key: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: int
    lease_token: str | None
    lease_expires_at: int | None
    last_status_code: int | None
    last_error: str | None
    created_at: int
    updated_at: int
    traceparent: str | None = None  # its job's trace context (tracing on): sent as a header
    sink: str | None = None  # the data sink it goes to (its name); None: a webhook to ``url``

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Delivery:
        return _from_row(cls, row, status=_STATUSES[row["status"]])

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "delivery",
            "endpoint_id": self.endpoint_id,
            "sink": self.sink,
            "url": self.url,
            "job_id": self.job_id,
            "event_type": self.event_type,
            "status": self.status.value,
            "attempts": self.attempts,
            "next_attempt_at": (
                iso(self.next_attempt_at) if self.status is DeliveryStatus.PENDING else None
            ),
            "last_status_code": self.last_status_code,
            "last_error": self.last_error,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "payload": self.payload,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    delivery_id: str
    attempted_at: int
    status_code: int | None
    latency_ms: int
    error: str | None
    response_excerpt: str | None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Attempt:
        return _from_row(cls, row)

    def as_json(self) -> dict[str, Any]:
        return {
            "attempted_at": iso(self.attempted_at),
            "status_code": self.status_code,
            "latency_ms": self.latency_ms,
            "error": self.error,
            "response_excerpt": self.response_excerpt,
        }


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AttemptOutcome:
    """What one send produced, and what the sender decided to do next."""

    status_code: int | None
    latency_ms: int
    error: str | None = None
    response_excerpt: str | None = None
    succeeded: bool = False
    next_attempt_at: int | None = None  # None: no more attempts (succeeded or dead-lettered)
    disable_endpoint: str | None = None  # a reason, when the endpoint must be disabled


# --- which events reach a destination, and the message that reports one

SECRET_PREFIX = "whsec_"
_JOB_TERMINAL = [e for e in EventType if e.is_terminal and e.value.startswith("job.")]
DEFAULT_JOB_EVENTS: tuple[str, ...] = tuple(sorted(e.value for e in _JOB_TERMINAL))
DEFAULT_BATCH_EVENTS: tuple[str, ...] = tuple(
    sorted(e.value for e in EventType if e.is_terminal and e.value.startswith("batch."))
)
# Events whose ``data`` is the whole job; batch events carry the batch, the others their own data.
_JOB_STATE_EVENTS = frozenset({EventType.QUEUED, EventType.STARTED, *_JOB_TERMINAL})
JOB_STATE_EVENT_TYPES = frozenset(e.value for e in _JOB_STATE_EVENTS)  # for hookline listen


def new_secret() -> str:
    """A new ``whsec_`` secret: 32 random bytes, base64."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(32)).decode()


def matches(filters: Iterable[str], event_type: str) -> bool:
    """Whether an event type passes a filter list (``*`` and ``job.*`` style wildcards allowed)."""
    for pattern in filters:
        if pattern == "*" or pattern == event_type:
            return True
        if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
            return True
    return False


def message_body(event: Event, job: Job | None) -> dict[str, Any]:
    """The body of the message that reports ``event``."""
    if job is not None and event.type in _JOB_STATE_EVENTS:
        data: dict[str, Any] = job_json(job)
    elif event.type.value.startswith("batch."):
        data = event.data
    else:
        data = {"job_id": event.job_id, "seq": event.seq, **event.data}
    return {"type": event.type.value, "timestamp": iso(event.created_at), "data": data}


# --- data sinks: which of the configured ones an event goes to


@dataclasses.dataclass(frozen=True, slots=True)
class SinkRoute:
    """A configured sink as the outbox sees it: its name, the events it takes, the tenants whose
    jobs it receives (fnmatch patterns), and whether every job goes there or only those that name
    it (``"sinks": [...]`` on the job or its batch)."""

    name: str
    events: tuple[str, ...]
    tenants: tuple[str, ...] = ("*",)
    all_jobs: bool = True

    def serves_tenant(self, tenant: str) -> bool:
        return any(fnmatch.fnmatchcase(tenant, pattern) for pattern in self.tenants)


class SinkRoutes:
    """The configured sinks, for the outbox: which take an event. Built once per process; an
    empty one (no sinks) costs the accept path one attribute test."""

    def __init__(self, routes: Iterable[SinkRoute] = ()) -> None:
        self.routes = {route.name: route for route in routes}
        self._every_job = [route for route in self.routes.values() if route.all_jobs]
        self._tenants: dict[str, tuple[SinkRoute, ...]] = {}  # every-job sinks by tenant

    def __bool__(self) -> bool:
        return bool(self.routes)

    def every_job(self, tenant: str) -> tuple[SinkRoute, ...]:
        """The sinks that receive every job of ``tenant``."""
        found = self._tenants.get(tenant)
        if found is None:
            found = tuple(r for r in self._every_job if r.serves_tenant(tenant))
            if len(self._tenants) < 10_000:
                self._tenants[tenant] = found
        return found

    def available(self, tenant: str) -> list[SinkRoute]:
        """The sinks a tenant may name, or receives anyway."""
        return [route for route in self.routes.values() if route.serves_tenant(tenant)]

    def unknown(self, tenant: str, names: Iterable[str]) -> list[str]:
        """Those of ``names`` that are no sink this tenant may use."""
        return [
            name
            for name in names
            if (route := self.routes.get(name)) is None or not route.serves_tenant(tenant)
        ]

    def destinations(self, tenant: str, event_type: str, named: Iterable[str] = ()) -> list[str]:
        """The sinks that take an event of ``event_type`` of ``tenant``'s job that named
        ``named``: each at most once, in configuration order."""
        chosen = [r.name for r in self.every_job(tenant) if matches(r.events, event_type)]
        for name in named:
            route = self.routes.get(name)
            if (
                route is not None
                and name not in chosen
                and route.serves_tenant(tenant)
                and matches(route.events, event_type)
            ):
                chosen.append(name)
        return chosen


NO_SINKS = SinkRoutes()
