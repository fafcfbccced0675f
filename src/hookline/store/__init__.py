"""Durable storage: the schema, the database access, and the interfaces all other layers use,
one per aggregate: :class:`Store` (jobs, events), :class:`Deliveries` (webhook endpoints,
secrets, the outbox), :class:`Batches` (files, batches) and :class:`Keys` (API keys); with their
SQL implementation for SQLite and PostgreSQL, opened by :func:`open_store`."""

from hookline.store.base import AcceptOutcome, Store
from hookline.store.base_batches import Batches, BatchRecord, BatchStatus, FileRecord
from hookline.store.base_deliveries import ClaimRequest, Deliveries, RecordedAttempt
from hookline.store.base_keys import ApiKey, Keys
from hookline.store.database import Capabilities
from hookline.store.sql import SQLStore, open_store

__all__ = [
    "AcceptOutcome",
    "ApiKey",
    "BatchRecord",
    "BatchStatus",
    "Batches",
    "Capabilities",
    "ClaimRequest",
    "Deliveries",
    "FileRecord",
    "Keys",
    "RecordedAttempt",
    "SQLStore",
    "Store",
    "open_store",
]
