"""Durable storage: the schema, the database access, and the :class:`Store` that all other layers use."""

from hookline.store.base import AcceptOutcome, Store
from hookline.store.sql import SQLStore, open_store

__all__ = ["AcceptOutcome", "SQLStore", "Store", "open_store"]
