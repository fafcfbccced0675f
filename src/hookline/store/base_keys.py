"""The API keys' storage interface. A key itself is never stored: only its SHA-256 (the hash
that finds it) and its first characters (the prefix that names it in a list). Beside the keys,
what is stored of the tenants they act for: a tenant's weight in fair sharing.

Each method is one transaction. Raises only :mod:`hookline.errors` exceptions.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

from hookline.fairness import KeyLimits
from hookline.jobs import iso
from hookline.store.database import Capabilities


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as stored. Times are epoch ms; ``last_used_at`` is kept to the minute
    (:data:`hookline.auth.LAST_USED_RESOLUTION_SECONDS`)."""

    id: str
    tenant: str
    name: str | None
    prefix: str  # the key's first characters: "hk_" and 7 more
    admin: bool  # may call the admin API (/v1/admin/…)
    created_at: int
    expires_at: int | None
    last_used_at: int | None
    revoked_at: int | None
    # Its own limits (hookline.fairness.KeyLimits); None: none.
    max_concurrency: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    daily_token_budget: int | None = None
    monthly_token_budget: int | None = None

    @property
    def limits(self) -> KeyLimits:
        return KeyLimits(
            self.max_concurrency, self.requests_per_minute, self.tokens_per_minute,
            self.daily_token_budget, self.monthly_token_budget,
        )  # fmt: skip

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> ApiKey:
        return cls(**{field.name: row[field.name] for field in dataclasses.fields(cls)})

    def status(self, now: int) -> str:
        """``active``, ``expired`` or ``revoked``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def as_json(self, now: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "api_key",
            "tenant": self.tenant,
            "name": self.name,
            "prefix": self.prefix,
            "admin": self.admin,
            "status": self.status(now),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "last_used_at": iso(self.last_used_at),
            "revoked_at": iso(self.revoked_at),
            "limits": self.limits.as_json(),
        }


class Keys(abc.ABC):
    """API keys: created, found by their hash, listed, revoked; and the tenants' weights."""

    capabilities: Capabilities  # the database's (see hookline.store.database)

    @abc.abstractmethod
    async def insert(self, key: ApiKey, key_hash: str, *, weight: float | None = None) -> None:
        """Store a new key under ``key_hash`` (unique); with ``weight``, set its tenant's weight
        too, in the same transaction (replacing the one stored)."""

    @abc.abstractmethod
    async def weights(self, tenants: Collection[str] | None = None) -> dict[str, float]:
        """The stored weights of ``tenants`` (None: of every tenant that has one)."""

    @abc.abstractmethod
    async def find(self, key_hash: str) -> ApiKey | None:
        """The key of that hash, revoked and expired ones too; None if there is none."""

    @abc.abstractmethod
    async def get(self, key_id: str) -> ApiKey | None:
        """The key of that id; None if there is none."""

    @abc.abstractmethod
    async def list(
        self, tenant: str | None = None, *, now: int, include_unusable: bool = False
    ) -> list[ApiKey]:
        """Keys oldest first, of ``tenant`` (None: every tenant's); revoked and expired ones (at
        ``now``) only with ``include_unusable``."""

    @abc.abstractmethod
    async def revoke(self, key_id: str, now: int) -> bool:
        """Mark the key revoked at ``now``; False if it is unknown or was revoked already."""

    @abc.abstractmethod
    async def touch(self, key_id: str, now: int) -> None:
        """Record that the key was used at ``now`` (a later time is never moved back)."""
