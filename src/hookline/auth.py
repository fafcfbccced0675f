"""API keys and tenants.

A key is ``hk_`` plus 32 random bytes (base32). Only its SHA-256 is stored, so a database leak
reveals no usable key; SHA-256 rather than a slow password hash is right here because keys are
random and long. Looked-up keys are cached for a short time so the accept path skips the database.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time

from hookline.clock import Clock, SystemClock
from hookline.errors import InvalidRequest, Unauthorized
from hookline.ids import new_id
from hookline.store.base import Store

KEY_PREFIX = "hk_"
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CACHE_SECONDS = 30.0


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + base64.b32encode(secrets.token_bytes(32)).decode().rstrip("=").lower()


class KeyRing:
    def __init__(self, store: Store, clock: Clock | None = None) -> None:
        self.store = store
        self.clock = clock or SystemClock()
        self._cache: dict[str, tuple[str, float]] = {}

    async def create(self, tenant: str) -> str:
        """Create and return a new key for ``tenant`` (the only time the key itself is seen)."""
        if not TENANT_PATTERN.match(tenant):
            raise InvalidRequest("tenant names are 1-64 characters: letters, digits, '_', '.', '-'")
        key = generate_key()
        await self.store.insert_api_key(
            new_id("key"), tenant, hash_key(key), key[:10], self.clock.now_ms()
        )
        return key

    async def tenant_for(self, authorization: str | None) -> str:
        """The tenant of a ``Bearer`` key, or :class:`Unauthorized`."""
        if not authorization:
            raise Unauthorized("missing Authorization header: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("the Authorization header must be 'Bearer <key>'")
        digest = hash_key(key)
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        tenant = await self.store.tenant_for_key_hash(digest)
        if tenant is None:
            raise Unauthorized("unknown or revoked API key")
        self._cache[digest] = (tenant, time.monotonic() + _CACHE_SECONDS)
        return tenant
