"""The contract of :class:`~hookline.store.base_keys.Keys`: what each operation's docstring
promises, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest

from hookline.ids import new_id
from hookline.store import ApiKey, Keys, Store, open_store
from tests.test_store import NOW

MINUTE = 60_000


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = await open_store(database_url)
    yield store
    await store.close()


@pytest.fixture
def keys(store: Store) -> Keys:
    return store.keys


def api_key(tenant: str = "acme", **changes: object) -> ApiKey:
    key = ApiKey(
        id=new_id("key"), tenant=tenant, name=None, prefix="hk_abcdefg", admin=False,
        created_at=NOW, expires_at=None, last_used_at=None, revoked_at=None,
    )  # fmt: skip
    return dataclasses.replace(key, **changes)  # type: ignore[arg-type]


async def test_a_key_is_found_by_its_hash_and_its_id_as_stored(keys: Keys) -> None:
    key = api_key(name="laptop", admin=True, expires_at=NOW + MINUTE)
    await keys.insert(key, "a" * 64)
    assert await keys.find("a" * 64) == key
    assert (await keys.find("a" * 64)).tenant == "acme"  # type: ignore[union-attr]
    assert await keys.find("b" * 64) is None
    assert await keys.get(key.id) == key
    assert await keys.get("key_unknown") is None


async def test_the_list_is_oldest_first_per_tenant_and_hides_unusable_keys(keys: Keys) -> None:
    first = api_key(created_at=NOW)
    second = api_key(created_at=NOW + 1)
    other = api_key("globex", created_at=NOW + 2)
    expired = api_key(created_at=NOW + 3, expires_at=NOW + MINUTE)
    revoked = api_key(created_at=NOW + 4)
    for number, key in enumerate([first, second, other, expired, revoked]):
        await keys.insert(key, f"{number}" * 64)
    assert await keys.revoke(revoked.id, NOW + 5)
    later = NOW + MINUTE
    assert [k.id for k in await keys.list("acme", now=later)] == [first.id, second.id]
    assert [k.id for k in await keys.list(now=later)] == [first.id, second.id, other.id]
    everything = await keys.list("acme", now=later, include_unusable=True)
    assert [k.id for k in everything] == [first.id, second.id, expired.id, revoked.id]
    assert [k.status(later) for k in everything] == ["active", "active", "expired", "revoked"]
    assert expired.id in [k.id for k in await keys.list("acme", now=later - 1)]  # not yet


async def test_a_key_is_revoked_once(keys: Keys) -> None:
    key = api_key()
    await keys.insert(key, "a" * 64)
    assert await keys.revoke(key.id, NOW + 1)
    assert not await keys.revoke(key.id, NOW + 2)  # revoked already: the first time stays
    assert not await keys.revoke("key_unknown", NOW + 2)
    assert (await keys.get(key.id)) == dataclasses.replace(key, revoked_at=NOW + 1)


async def test_the_last_use_only_moves_forward(keys: Keys) -> None:
    key = api_key()
    await keys.insert(key, "a" * 64)
    await keys.touch(key.id, NOW + MINUTE)
    await keys.touch(key.id, NOW + 1)  # a slower process's older news
    assert (await keys.get(key.id)).last_used_at == NOW + MINUTE  # type: ignore[union-attr]


async def test_a_key_may_set_its_tenants_weight_which_the_next_one_replaces(keys: Keys) -> None:
    assert await keys.weights() == {}
    await keys.insert(api_key("acme"), "a" * 64, weight=3)
    await keys.insert(api_key("globex"), "b" * 64)  # no weight: none stored
    assert await keys.weights() == {"acme": 3.0}
    await keys.insert(api_key("acme", created_at=NOW + 1), "c" * 64, weight=0.5)
    await keys.insert(api_key("initech"), "d" * 64, weight=2)
    assert await keys.weights(["acme", "globex"]) == {"acme": 0.5}
    assert await keys.weights() == {"acme": 0.5, "initech": 2.0}
    assert await keys.weights([]) == {}
