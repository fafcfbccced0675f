"""hookline's exception tree. Callers catch these, never a driver's own exceptions.

    HooklineError
    ├── NotFound            the object does not exist or belongs to another tenant
    ├── Conflict            the request contradicts stored state (idempotency key reused, bad transition)
    ├── InvalidRequest      input that passed schema checks but cannot be served (unknown model, …)
    ├── Unauthorized        missing or unknown API key
    ├── LimitReached        a tenant's limit keeps a call from starting now, or its budget is spent
    └── StoreError          the database failed
        └── StoreUnavailable   the database cannot be reached right now (retry later)
            └── StoreFull      the database's disk is full (retry once space is freed)

The store translates SQLAlchemy/asyncpg/sqlite3 errors into StoreError at its boundary; the API turns
each class into one problem+json status.
"""

from __future__ import annotations


class HooklineError(Exception):
    """Base of every error hookline raises on purpose."""


class NotFound(HooklineError):
    pass


class Conflict(HooklineError):
    pass


class InvalidRequest(HooklineError):
    pass


class TooLarge(InvalidRequest):
    """An upload passes its size limit (HTTP 413)."""


class Unauthorized(HooklineError):
    pass


class LimitReached(HooklineError):
    """A call that may not start now (its tenant's concurrency, requests or tokens per minute,
    or its upstream's tokens per minute: 429), or a tenant whose token budget is spent (402, or
    the status the operator chose). ``kind`` names the limit; ``retry_after``: the seconds until
    room may come back, when known."""

    def __init__(
        self, message: str, *, kind: str, status: int = 429, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after


class StoreError(HooklineError):
    pass


class StoreUnavailable(StoreError):
    pass


class StoreFull(StoreUnavailable):
    """Nothing more can be written until disk space is freed; nothing half-written stays."""
