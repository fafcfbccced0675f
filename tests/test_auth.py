"""API keys: a revoked key stops working at once in every process, an expired one at its time;
names, last use, and the admin API."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from hookline.auth import CACHE_SECONDS, LAST_USED_RESOLUTION_SECONDS, KeyRing
from hookline.clock import ManualClock
from hookline.errors import Unauthorized
from hookline.gateway import Gateway
from tests.conftest import LiveGateway, gateway_settings
from tests.scripted_upstream import ScriptedUpstream
from tests.test_api_errors import assert_problem


@contextlib.asynccontextmanager
async def api_process(
    database_url: str, upstream: ScriptedUpstream, clock: ManualClock
) -> AsyncIterator[Gateway]:
    """A gateway as an API process runs it: its own keys, notifier and (on PostgreSQL)
    broadcast, sharing only the database."""
    gateway = Gateway(gateway_settings(database_url, upstream.base_url), clock=clock)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


async def refused(keys: KeyRing, key: str, within: float = 2.0) -> str:
    """The refusal of ``key``, which must come within ``within`` seconds of real time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            await keys.tenant_for(f"Bearer {key}")
        except Unauthorized as exc:
            return str(exc)
        assert loop.time() < deadline, "the revoked key is still accepted"
        await asyncio.sleep(0.01)


async def test_a_revoked_key_is_refused_at_once_by_every_process(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    # The clock never moves: no cache lapses, so only the revocation's announcement (NOTIFY on
    # PostgreSQL, the mark file on SQLite) can stop the other process from taking the key.
    clock = ManualClock()
    async with (
        api_process(database_url, upstream, clock) as here,
        api_process(database_url, upstream, clock) as elsewhere,
    ):
        key = await here.keys.create("acme")
        assert await here.keys.tenant_for(f"Bearer {key}") == "acme"
        assert await elsewhere.keys.tenant_for(f"Bearer {key}") == "acme"  # cached there now
        assert await here.keys.revoke(key)
        with pytest.raises(Unauthorized, match="revoked"):
            await here.keys.tenant_for(f"Bearer {key}")
        assert "revoked" in await refused(elsewhere.keys, key, within=1.0)
        assert not await here.keys.revoke(key)  # once is enough
        assert not await here.keys.revoke("hk_never_made")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_lost_announcement_costs_at_most_the_cache_time(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    clock = ManualClock()
    async with api_process(database_url, upstream, clock) as gateway:
        key = await gateway.keys.create("acme")
        deaf = KeyRing(gateway.store, clock)  # a process whose broadcast was down meanwhile
        assert await deaf.tenant_for(f"Bearer {key}") == "acme"
        assert await gateway.keys.revoke(key)
        assert await deaf.tenant_for(f"Bearer {key}") == "acme"  # cached, for a moment
        clock.advance(CACHE_SECONDS)
        with pytest.raises(Unauthorized, match="revoked"):
            await deaf.tenant_for(f"Bearer {key}")


async def test_a_key_expires_at_its_time_cached_or_not(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    clock = ManualClock()
    async with api_process(database_url, upstream, clock) as gateway:
        key = await gateway.keys.create("acme", expires_at=clock.now_ms() + 500)
        assert await gateway.keys.tenant_for(f"Bearer {key}") == "acme"
        clock.advance(0.5)  # within the cache time
        with pytest.raises(Unauthorized, match="expired"):
            await gateway.keys.tenant_for(f"Bearer {key}")
        with pytest.raises(Exception, match="not in the future"):
            await gateway.keys.create("acme", expires_at=clock.now_ms())


async def test_the_last_use_is_kept_to_the_minute(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    clock = ManualClock()
    async with api_process(database_url, upstream, clock) as gateway:
        key, record = await gateway.keys.issue("acme", name="laptop")
        assert record.last_used_at is None and record.name == "laptop"
        first = clock.now_ms()
        await gateway.keys.tenant_for(f"Bearer {key}")
        clock.advance(LAST_USED_RESOLUTION_SECONDS / 2)
        await gateway.keys.tenant_for(f"Bearer {key}")  # read again (the cache lapsed): no write
        assert (await gateway.keys.find(key)).last_used_at == first  # type: ignore[union-attr]
        clock.advance(LAST_USED_RESOLUTION_SECONDS / 2)
        await gateway.keys.tenant_for(f"Bearer {key}")
        assert (await gateway.keys.find(key)).last_used_at == clock.now_ms()  # type: ignore[union-attr]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_revoked_key_is_refused_by_the_api_at_once(live: LiveGateway) -> None:
    async with await live.client_for("globex") as client:
        assert (await client.get("/v1/jobs")).status_code == 200
        key = client.headers["authorization"].removeprefix("Bearer ")
        assert await live.gateway.keys.revoke(key)
        assert_problem(await client.get("/v1/jobs"), 401, "revoked")
        assert_problem(await client.post("/v1/chat/completions", json={}), 401)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_admin_api_lists_creates_and_revokes_keys(live: LiveGateway) -> None:
    admin_key = await live.gateway.keys.create("ops", name="dashboard", admin=True)
    admin = httpx.AsyncClient(
        base_url=live.base_url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30
    )
    async with admin:
        refused_here = await live.client.get("/v1/admin/keys")  # a tenant's key
        assert_problem(refused_here, 403, "admin key")

        made = await admin.post(
            "/v1/admin/keys", json={"tenant": "globex", "name": "ci", "expires_in_seconds": 3600}
        )
        assert made.status_code == 201, made.text
        created = made.json()
        assert created["key"].startswith(created["prefix"]) and created["status"] == "active"
        assert created["expires_at"] is not None and created["last_used_at"] is None
        headers = {"Authorization": f"Bearer {created['key']}"}
        assert (await admin.get("/v1/jobs", headers=headers)).status_code == 200

        listed = (await admin.get("/v1/admin/keys")).json()["data"]
        assert [k["tenant"] for k in listed] == ["acme", "ops", "globex"]  # every tenant's
        assert all("key" not in k for k in listed)  # a key is shown once, when it is made
        only = (await admin.get("/v1/admin/keys", params={"tenant": "globex"})).json()["data"]
        assert [k["id"] for k in only] == [created["id"]]
        shown = (await admin.get(f"/v1/admin/keys/{created['id']}")).json()
        assert shown["name"] == "ci" and shown["last_used_at"] is not None

        revoked = await admin.post(f"/v1/admin/keys/{created['id']}/revoke")
        assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
        assert_problem(await admin.get("/v1/jobs", headers=headers), 401, "revoked")
        everything = (await admin.get("/v1/admin/keys", params={"all": "true"})).json()["data"]
        assert [k["status"] for k in everything] == ["active", "active", "revoked"]
        assert (await admin.get("/v1/admin/keys")).json()["data"] == listed[:2]

        assert_problem(await admin.get("/v1/admin/keys/key_unknown"), 404)
        assert_problem(await admin.post(f"/v1/admin/keys/{created['key']}/revoke"), 404)
        assert_problem(await admin.post("/v1/admin/keys", json={"tenant": "no spaces"}), 422)
        limited = await admin.post(
            "/v1/admin/keys",
            json={"tenant": "globex", "max_concurrency": 2, "tokens_per_minute": 9},
        )
        assert limited.status_code == 201, limited.text
        assert limited.json()["limits"] == {"max_concurrency": 2, "tokens_per_minute": 9}
        zero = {"tenant": "globex", "requests_per_minute": 0}
        assert_problem(await admin.post("/v1/admin/keys", json=zero), 422)
