"""hookline's exception tree. Callers catch these, never a driver's own exceptions.

    HooklineError
    ├── NotFound            the object does not exist or belongs to another tenant
    ├── Conflict            the request contradicts stored state (idempotency key reused, bad transition)
    ├── InvalidRequest      input that passed schema checks but cannot be served (unknown model, …)
    ├── Unauthorized        missing or unknown API key
    └── StoreError          the database failed
        └── StoreUnavailable   the database cannot be reached right now (retry later)

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


class StoreError(HooklineError):
    pass


class StoreUnavailable(StoreError):
    pass
