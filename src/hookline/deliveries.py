"""Delivery records: the outbox rows the webhook sender works through, and what the API shows."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from hookline.jobs import iso

T = TypeVar("T")


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _from_row(cls: type[T], row: Mapping[Any, Any]) -> T:
    """A record whose fields are named like the row's columns."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    return cls(**{name: row[name] for name in names})


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
    status: str
    attempts: int
    next_attempt_at: int
    lease_token: str | None
    lease_expires_at: int | None
    last_status_code: int | None
    last_error: str | None
    created_at: int
    updated_at: int

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Delivery:
        return _from_row(cls, row)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "delivery",
            "endpoint_id": self.endpoint_id,
            "url": self.url,
            "job_id": self.job_id,
            "event_type": self.event_type,
            "status": self.status,
            "attempts": self.attempts,
            "next_attempt_at": iso(self.next_attempt_at) if self.status == "pending" else None,
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


@dataclasses.dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """What one send produced, and what the sender decided to do next."""

    status_code: int | None
    latency_ms: int
    error: str | None
    response_excerpt: str | None
    succeeded: bool
    next_attempt_at: int | None  # None: no more attempts (succeeded or dead-lettered)
    disable_endpoint: str | None = None  # a reason, when the endpoint must be disabled
