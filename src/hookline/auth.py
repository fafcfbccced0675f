"""API keys and tenants.

A key is ``hk_`` plus 32 random bytes (base32). Only its SHA-256 is stored, so a database leak
reveals no usable key; SHA-256 rather than a slow password hash is right here because keys are
random and long. A key may carry a name, an expiry and the admin role (the admin API,
``/v1/admin/…``).

A key found valid is cached for :data:`CACHE_SECONDS`, so the accept path skips the database.
A revocation reaches every process at once all the same: the revoking process forgets its cache
and announces it, on PostgreSQL by the notify topic ``keys.revoked``, which
:mod:`hookline.live.broadcast` carries to every other process, and between processes sharing a
SQLite file by a :class:`~hookline.live.marks.FileMark` that each checks (one ``stat``) before it
trusts its cache. :data:`CACHE_SECONDS` bounds what an announcement lost on the way (a dropped
connection) can cost. An expiry is checked on every use, cached or not. The time a key was last
used is written at most every :data:`LAST_USED_RESOLUTION_SECONDS` per key and process.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import logging
import re
import secrets

from hookline.clock import Clock, SystemClock
from hookline.errors import InvalidRequest, StoreError, Unauthorized
from hookline.fairness import NO_KEY_LIMITS, KeyLimits
from hookline.ids import new_id
from hookline.jobs import iso
from hookline.live.marks import FileMark
from hookline.live.notify import KEYS_REVOKED, Notifier
from hookline.live.relay import relay_directory
from hookline.store.base import Store
from hookline.store.base_keys import ApiKey

log = logging.getLogger("hookline.auth")

KEY_PREFIX = "hk_"
KEY_ID_PREFIX = "key_"
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_NAME_LENGTH = 128
MAX_WEIGHT = 10_000.0  # as a [[tenants]] entry's weight
MAX_LIMIT = 2**53  # a key's limit: stored in a BIGINT, and exact in JSON
# A database read per key every 2 s costs nothing on the accept path (thousands of requests per
# second share it) and bounds how long a lost revocation announcement can be missed.
CACHE_SECONDS = 2.0
LAST_USED_RESOLUTION_SECONDS = 60.0


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + base64.b32encode(secrets.token_bytes(32)).decode().rstrip("=").lower()


def revocation_mark(file_path: str) -> FileMark:
    """The mark the processes sharing the database file ``file_path`` tell revocations by."""
    return FileMark(relay_directory(file_path) / "keys-revoked.mark")


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Who a valid key speaks for."""

    key_id: str
    tenant: str
    admin: bool
    expires_at: int | None  # epoch ms
    limits: KeyLimits = NO_KEY_LIMITS  # the key's own (hookline.fairness)


class KeyRing:
    """The keys of one process: creates, checks and revokes them. With a ``notifier`` (the
    gateway's), revocations announced by other processes reach this one's cache."""

    def __init__(
        self, store: Store, clock: Clock | None = None, notifier: Notifier | None = None
    ) -> None:
        self.store = store
        self.keys = store.keys
        self.clock = clock or SystemClock()
        self.notifier = notifier
        self._cache: dict[str, tuple[Caller, int]] = {}  # key hash -> (caller, when looked up)
        self._forgotten = 0  # counts cache clears: a lookup across one does not cache its read
        path = store.capabilities.file_path
        self._mark = revocation_mark(path) if path is not None else None
        if notifier is not None:
            notifier.subscribe(KEYS_REVOKED, lambda _payload: self.forget())

    async def issue(
        self,
        tenant: str,
        *,
        name: str | None = None,
        expires_at: int | None = None,
        admin: bool = False,
        weight: float | None = None,
        limits: KeyLimits = NO_KEY_LIMITS,
    ) -> tuple[str, ApiKey]:
        """A new key for ``tenant`` (the only time the key itself is seen) and its record; with
        ``weight``, the tenant's stored weight in fair sharing is set to it as well. ``limits``
        are the key's own, within its tenant's; they are kept as long as the key."""
        if not TENANT_PATTERN.match(tenant):
            raise InvalidRequest("tenant names are 1-64 characters: letters, digits, '_', '.', '-'")
        if weight is not None and not (0 < weight <= MAX_WEIGHT):
            raise InvalidRequest(f"a weight is above 0 and at most {MAX_WEIGHT:g}")
        if name is not None and not (0 < len(name) <= MAX_NAME_LENGTH and name.isprintable()):
            raise InvalidRequest(f"key names are 1-{MAX_NAME_LENGTH} printable characters")
        for field, value in limits.as_json().items():
            if not 1 <= value <= MAX_LIMIT:
                raise InvalidRequest(f"{field} is at least 1 and at most {MAX_LIMIT:,}")
        now = self.clock.now_ms()
        if expires_at is not None and expires_at <= now:
            raise InvalidRequest(f"the expiry {iso(expires_at)} is not in the future")
        key = generate_key()
        record = ApiKey(
            id=new_id("key"), tenant=tenant, name=name, prefix=key[:10], admin=admin,
            created_at=now, expires_at=expires_at, last_used_at=None, revoked_at=None,
            **limits.as_json(),
        )  # fmt: skip
        await self.keys.insert(record, hash_key(key), weight=weight)
        return key, record

    async def create(
        self,
        tenant: str,
        *,
        name: str | None = None,
        expires_at: int | None = None,
        admin: bool = False,
    ) -> str:
        """A new key for ``tenant``, as :meth:`issue` makes it; only the key."""
        key, _ = await self.issue(tenant, name=name, expires_at=expires_at, admin=admin)
        return key

    async def tenant_for(self, authorization: str | None) -> str:
        """The tenant of a ``Bearer`` key, or :class:`Unauthorized`."""
        return (await self.caller_for(authorization)).tenant

    async def caller_for(self, authorization: str | None) -> Caller:
        """Who a ``Bearer`` key speaks for, or :class:`Unauthorized` (a missing, malformed,
        unknown, revoked or expired key)."""
        if not authorization:
            raise Unauthorized("missing Authorization header: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("the Authorization header must be 'Bearer <key>'")
        if self._mark is not None and self._mark.moved():
            self.forget()  # another process revoked a key
        digest = hash_key(key)
        now = self.clock.now_ms()
        cached = self._cache.get(digest)
        if cached is not None and 0 <= now - cached[1] < CACHE_SECONDS * 1000:
            caller = cached[0]
            if caller.expires_at is None or now < caller.expires_at:
                return caller
        forgotten = self._forgotten
        found = await self.keys.find(digest)
        if found is None or found.status(now) != "active":
            self._cache.pop(digest, None)
            raise Unauthorized(_refusal(found, now))
        caller = Caller(found.id, found.tenant, found.admin, found.expires_at, found.limits)
        if forgotten == self._forgotten:  # no revocation meanwhile: what was read holds
            self._cache[digest] = (caller, now)
        if found.last_used_at is None or (
            now - found.last_used_at >= LAST_USED_RESOLUTION_SECONDS * 1000
        ):
            with contextlib.suppress(StoreError):  # a full disk still lets a key read
                await self.keys.touch(found.id, now)
        return caller

    async def find(self, key_or_id: str) -> ApiKey | None:
        """A key's record, given the key itself (``hk_…``) or its id (``key_…``)."""
        key_or_id = key_or_id.strip()
        if key_or_id.startswith(KEY_PREFIX):
            return await self.keys.find(hash_key(key_or_id))
        return await self.keys.get(key_or_id)

    async def list(
        self, tenant: str | None = None, *, include_unusable: bool = False
    ) -> list[ApiKey]:
        """Keys oldest first, of ``tenant`` or every tenant; usable ones unless
        ``include_unusable`` (revoked, expired)."""
        return await self.keys.list(
            tenant, now=self.clock.now_ms(), include_unusable=include_unusable
        )

    async def revoke(self, key_or_id: str) -> bool:
        """Revoke a key, given itself or its id: refused at once by every process (see the
        module docstring). False if it was unknown or already revoked."""
        found = await self.find(key_or_id)
        if found is None:
            return False
        revoked = await self.keys.revoke(found.id, self.clock.now_ms())
        self.forget()
        if self.notifier is not None:
            self.notifier.publish(KEYS_REVOKED)  # the broadcast carries it to the others
        if self._mark is not None:
            self._mark.bump()
        return revoked

    def forget(self) -> None:
        """Drop every cached key: the next use of each reads the database."""
        self._forgotten += 1
        self._cache.clear()


def _refusal(key: ApiKey | None, now: int) -> str:
    if key is None:
        return "unknown API key"
    if key.revoked_at is not None:
        return f"this API key ({key.prefix}…) was revoked at {iso(key.revoked_at)}"
    return f"this API key ({key.prefix}…) expired at {iso(key.expires_at)}"
