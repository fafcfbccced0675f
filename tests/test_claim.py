"""The fair claim's contract (hookline.fairness, hookline.store.claim): lanes, tenants by weight,
per-tenant and per-upstream limits, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from hookline.config import TenantLimits
from hookline.fairness import FairPolicy
from hookline.jobs import Job, JobStatus, Lane
from hookline.store import SQLStore, open_store
from hookline.store.base import Claimed
from tests.test_store import NOW, QUEUED, make_job
from tests.test_store_keys import api_key

EVEN = FairPolicy()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SQLStore]:
    store = await open_store(database_url)
    yield store
    await store.close()


async def queue(store: SQLStore, tenant: str, n: int, **changes: Any) -> list[Job]:
    made = [make_job(tenant, **changes) for _ in range(n)]
    await store.insert_jobs([(job, QUEUED) for job in made])
    return made


async def claim(
    store: SQLStore,
    limit: int,
    policy: FairPolicy = EVEN,
    *,
    now: int = NOW,
    max_running: int | None = None,
    token: str = "lease_a",
) -> Claimed:
    return await store.claim_jobs(
        "u", limit, now=now, lease_token=token, lease_expires_at=now + 30_000,
        max_running=max_running, policy=policy,
    )  # fmt: skip


def tenants_of(claimed: Claimed) -> list[str]:
    return [c.job.tenant for c in claimed.jobs]


async def finish(store: SQLStore, claimed: Claimed, now: int = NOW, **settle: Any) -> None:
    for c in claimed.jobs:
        await store.transition(
            c.job.id, JobStatus.SUCCEEDED, now=now, lease_token=c.job.lease_token, **settle
        )


async def test_a_tenant_that_comes_later_is_not_served_after_the_first_ones_backlog(
    store: SQLStore,
) -> None:
    await queue(store, "a", 200)
    await queue(store, "b", 6)
    started: list[str] = []
    for _ in range(12):  # one slot frees at a time, as on a busy upstream
        started += tenants_of(await claim(store, 1))
    assert started.count("b") == 6, started
    assert started.index("b") <= 1 and started[-1] in ("a", "b")
    # Served in turn: b's six went in the first twelve starts, not after a's 200.
    assert started[:12].count("a") == 6


async def test_weights_share_the_starts(store: SQLStore) -> None:
    await queue(store, "heavy", 400)
    await queue(store, "light", 400)
    policy = FairPolicy(tenants={"heavy": TenantLimits(weight=3)})
    counts: Counter[str] = Counter()
    while sum(counts.values()) < 400:
        counts.update(tenants_of(await claim(store, 7, policy)))
    ratio = counts["heavy"] / counts["light"]
    assert 2.7 <= ratio <= 3.3, counts


async def test_a_stored_weight_shares_the_starts_unless_the_tenants_entry_sets_one(
    store: SQLStore,
) -> None:
    """``hookline keys create --weight 3`` stores the weight; a [[tenants]] entry that sets a
    weight wins over it, one that sets only limits keeps it."""
    await queue(store, "heavy", 400)
    await queue(store, "light", 400)
    await store.keys.insert(api_key("heavy"), "a" * 64, weight=3)
    counts: Counter[str] = Counter()
    while sum(counts.values()) < 200:
        counts.update(tenants_of(await claim(store, 7)))
    assert 2.7 <= counts["heavy"] / counts["light"] <= 3.3, counts
    pinned = FairPolicy(tenants={"heavy": TenantLimits(weight=1)})
    counts.clear()
    while sum(counts.values()) < 200:
        counts.update(tenants_of(await claim(store, 7, pinned)))
    assert 0.9 <= counts["heavy"] / counts["light"] <= 1.1, counts
    assert FairPolicy(tenants={"heavy": TenantLimits(max_concurrency=9)}).weight("heavy", 3) == 3
    assert pinned.weight("heavy", 3) == 1 and pinned.weight("light", 2) == 2


async def test_a_tenant_back_from_idle_is_neither_owed_nor_in_debt(store: SQLStore) -> None:
    await queue(store, "a", 30)
    for _ in range(10):  # a alone: ten starts
        assert tenants_of(await claim(store, 1)) == ["a"]
    await queue(store, "b", 10)
    started = [t for _ in range(8) for t in tenants_of(await claim(store, 1))]
    assert started.count("b") == 4, started  # turns from now on, not ten in a row for b


async def test_a_tenants_own_jobs_keep_their_priority_order(store: SQLStore) -> None:
    low = await queue(store, "a", 2)
    [high] = await queue(store, "a", 1, priority=5)
    await queue(store, "b", 3)
    claimed = await claim(store, 6)
    mine = [c.job.id for c in claimed.jobs if c.job.tenant == "a"]
    assert mine == [high.id, low[0].id, low[1].id]


async def test_interactive_work_never_waits_behind_batch_items(store: SQLStore) -> None:
    await queue(store, "a", 100, lane=Lane.BATCH)
    await queue(store, "a", 3, lane=Lane.DEFAULT)
    chats = await queue(store, "b", 5, lane=Lane.INTERACTIVE)
    claimed = await claim(store, 8, FairPolicy(batch_min_share=0))
    lanes = [c.job.lane for c in claimed.jobs]
    assert lanes == [Lane.INTERACTIVE] * 5 + [Lane.DEFAULT] * 3
    assert {c.job.id for c in claimed.jobs} >= {job.id for job in chats}


async def test_batch_items_keep_their_floor_under_constant_interactive_load(
    store: SQLStore,
) -> None:
    await queue(store, "a", 100, lane=Lane.BATCH)
    await queue(store, "b", 200, lane=Lane.INTERACTIVE)
    policy = FairPolicy(batch_min_share=0.1)
    lanes = [c.job.lane for _ in range(100) for c in (await claim(store, 1, policy)).jobs]
    assert 8 <= lanes.count(Lane.BATCH) <= 12, Counter(lanes)
    # Batch items fill what the interactive lane leaves.
    lanes = [c.job.lane for c in (await claim(store, 200, policy)).jobs]
    assert lanes.count(Lane.INTERACTIVE) == 110 and lanes[-1] is Lane.BATCH


async def test_a_tenants_concurrency_holds_and_the_others_take_the_room(
    store: SQLStore,
) -> None:
    await queue(store, "a", 10)
    await queue(store, "b", 10)
    policy = FairPolicy(tenants={"a": TenantLimits(max_concurrency=2)})
    first = await claim(store, 8, policy)
    assert Counter(tenants_of(first)) == {"a": 2, "b": 6}
    assert first.held_back
    assert tenants_of(await claim(store, 8, policy)) == ["b"] * 4
    await finish(store, Claimed([c for c in first.jobs if c.job.tenant == "a"][:1]))
    assert tenants_of(await claim(store, 8, policy)) == ["a"]


async def test_requests_per_minute_hold_over_a_rolling_minute(store: SQLStore) -> None:
    await queue(store, "a", 10)
    policy = FairPolicy(tenants={"a": TenantLimits(requests_per_minute=3)})
    first = await claim(store, 10, policy)
    assert len(first.jobs) == 3
    later = await claim(store, 10, policy, now=NOW + 59_000)
    assert later.jobs == [] and later.next_token_at == NOW + 60_000
    assert len((await claim(store, 10, policy, now=NOW + 60_000)).jobs) == 3


async def test_tokens_per_minute_reserve_at_the_start_and_settle_at_the_end(
    store: SQLStore,
) -> None:
    await queue(store, "a", 10, expected_tokens=1000)
    policy = FairPolicy(tenants={"a": TenantLimits(tokens_per_minute=3000)})
    first = await claim(store, 10, policy)
    assert len(first.jobs) == 3  # three of 1000 reserved
    assert (await claim(store, 10, policy, now=NOW + 1)).jobs == []
    await finish(store, first, now=NOW + 2, settle_tokens=100)  # they used 100 each
    assert len((await claim(store, 10, policy, now=NOW + 3)).jobs) == 2  # 300 + two of 1000


async def test_a_job_larger_than_the_token_limit_starts_alone(store: SQLStore) -> None:
    await queue(store, "a", 2, expected_tokens=5000)
    policy = FairPolicy(tenants={"a": TenantLimits(tokens_per_minute=3000)})
    assert len((await claim(store, 10, policy)).jobs) == 1
    assert (await claim(store, 10, policy, now=NOW + 1)).jobs == []


async def test_an_upstreams_tokens_per_minute_hold_for_every_tenant(store: SQLStore) -> None:
    await queue(store, "a", 5, expected_tokens=1000)
    await queue(store, "b", 5, expected_tokens=1000)
    policy = FairPolicy(upstream_tokens_per_minute={"u": 4000})
    first = await claim(store, 10, policy)
    assert Counter(tenants_of(first)) == {"a": 2, "b": 2}
    held = await claim(store, 10, policy, now=NOW + 1)
    assert held.jobs == [] and held.next_token_at == NOW + 60_000


async def limited_key(store: SQLStore, tenant: str = "a", **limits: int) -> str:
    key = api_key(tenant, **limits)
    await store.keys.insert(key, key.id.ljust(64, "0"))
    return key.id


def keys_of(claimed: Claimed) -> list[str | None]:
    return [c.job.key_id for c in claimed.jobs]


async def test_a_keys_concurrency_holds_and_the_tenants_other_keys_run_alongside(
    store: SQLStore,
) -> None:
    ci = await limited_key(store, max_concurrency=1)
    await queue(store, "a", 5, key_id=ci)  # ahead of the other key's in the tenant's queue
    await queue(store, "a", 3, key_id="key_other")
    first = await claim(store, 8)
    assert Counter(keys_of(first)) == {ci: 1, "key_other": 3}
    assert first.held_back
    assert (await claim(store, 8)).jobs == []
    await finish(store, Claimed([c for c in first.jobs if c.job.key_id == ci]))
    assert keys_of(await claim(store, 8)) == [ci]


async def test_a_key_held_at_its_limit_leaves_its_tenants_turn_to_its_other_keys(
    store: SQLStore,
) -> None:
    ci = await limited_key(store, max_concurrency=1)
    await queue(store, "a", 1, key_id=ci)
    await claim(store, 1)
    await queue(store, "a", 50, key_id=ci)  # many waiting behind the key's limit
    await queue(store, "a", 2, key_id="key_other")
    await queue(store, "b", 2)
    claimed = await claim(store, 8)
    assert Counter((c.job.tenant, c.job.key_id) for c in claimed.jobs) == {
        ("a", "key_other"): 2,
        ("b", None): 2,
    }


async def test_a_keys_requests_per_minute_hold_over_a_rolling_minute(store: SQLStore) -> None:
    ci = await limited_key(store, requests_per_minute=2)
    await queue(store, "a", 6, key_id=ci)
    await queue(store, "a", 1, key_id="key_other", priority=-1)  # after all of the key's
    first = await claim(store, 10)
    assert Counter(keys_of(first)) == {ci: 2, "key_other": 1}
    later = await claim(store, 10, now=NOW + 59_000)
    assert later.jobs == [] and later.next_token_at == NOW + 60_000
    assert keys_of(await claim(store, 10, now=NOW + 60_000)) == [ci, ci]


async def test_a_keys_tokens_per_minute_hold(store: SQLStore) -> None:
    ci = await limited_key(store, tokens_per_minute=2500)
    await queue(store, "a", 5, key_id=ci, expected_tokens=1000)
    await queue(store, "a", 2, key_id="key_other", expected_tokens=1000, priority=-1)
    first = await claim(store, 10)
    assert Counter(keys_of(first)) == {ci: 2, "key_other": 2}
    held = await claim(store, 10, now=NOW + 1)
    assert held.jobs == [] and held.next_token_at == NOW + 60_000


async def test_a_key_within_a_limited_tenant_is_held_by_both(store: SQLStore) -> None:
    ci = await limited_key(store, max_concurrency=3)
    await queue(store, "a", 5, key_id=ci)
    policy = FairPolicy(tenants={"a": TenantLimits(max_concurrency=2)})
    assert keys_of(await claim(store, 10, policy)) == [ci, ci]


async def test_a_job_accepted_running_waits_when_the_tenant_is_at_its_limit(
    store: SQLStore,
) -> None:
    policy = FairPolicy(tenants={"a": TenantLimits(max_concurrency=1)})
    [running] = await queue(store, "a", 1)
    await claim(store, 1, policy)
    accepted = make_job("a", status=JobStatus.RUNNING, attempts=1, lease_token="lease_x",
                        lease_expires_at=NOW + 30_000, event_seq=2)  # fmt: skip
    outcome = await store.accept_job(accepted, [QUEUED, QUEUED], 10, policy)
    assert outcome.job.status is JobStatus.QUEUED
    other = make_job("b", status=JobStatus.RUNNING, attempts=1, lease_token="lease_y",
                     lease_expires_at=NOW + 30_000, event_seq=2)  # fmt: skip
    assert (await store.accept_job(other, [QUEUED, QUEUED], 10, policy)).job.status is (
        JobStatus.RUNNING
    )
    assert running.tenant == "a"


async def test_a_job_accepted_running_does_not_pass_interactive_jobs_waiting(
    store: SQLStore,
) -> None:
    await queue(store, "a", 2, lane=Lane.INTERACTIVE)
    accepted = make_job("b", status=JobStatus.RUNNING, attempts=1, lease_token="lease_x",
                        lease_expires_at=NOW + 30_000, event_seq=2, lane=Lane.INTERACTIVE)  # fmt: skip
    assert (await store.accept_job(accepted, [QUEUED, QUEUED], 2, EVEN)).job.status is (
        JobStatus.QUEUED
    )
    more_room = make_job("b", status=JobStatus.RUNNING, attempts=1, lease_token="lease_y",
                         lease_expires_at=NOW + 30_000, event_seq=2)  # fmt: skip
    # Room beyond the three interactive jobs queued now (the first accept's among them).
    assert (await store.accept_job(more_room, [QUEUED, QUEUED], 4, EVEN)).job.status is (
        JobStatus.RUNNING
    )


@contextlib.contextmanager
def statements() -> Iterator[list[str]]:
    executed: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        executed.append(statement)

    sa.event.listen(sa.Engine, "before_cursor_execute", count)
    try:
        yield executed
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", count)


async def test_the_claim_costs_the_same_statements_whatever_the_number_of_tenants(
    store: SQLStore,
) -> None:
    """No statement per tenant: two tenants or forty, limited or not, one claim is a fixed
    number of statements."""
    limited = FairPolicy(
        defaults=TenantLimits(max_concurrency=100, requests_per_minute=1000),
        upstream_tokens_per_minute={"u": 10**9},
    )
    counts = []
    for n, policy in ((2, EVEN), (40, EVEN), (2, limited), (40, limited)):
        for i in range(n):
            await queue(store, f"t{n}_{i}", 2, lane=(Lane.DEFAULT, Lane.BATCH)[i % 2])
        with statements() as executed:
            claimed = await claim(store, 2 * n, policy)
        assert len(claimed.jobs) == 2 * n
        await finish(store, claimed)
        counts.append(len([s for s in executed if not s.lstrip().upper().startswith(
            ("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE"))]))  # fmt: skip
    assert counts[0] == counts[1] and counts[2] == counts[3], counts


async def test_keys_with_limits_cost_the_same_statements_whatever_their_number(
    store: SQLStore,
) -> None:
    """A tenant's keys with limits of their own: one statement more for all of them, two keys
    or forty; keys without limits cost no statement."""
    counts = []
    for n in (2, 40):
        for i in range(n):
            key = await limited_key(store, f"k{n}_{i}", max_concurrency=5, requests_per_minute=100)
            await queue(store, f"k{n}_{i}", 2, key_id=key)
        with statements() as executed:
            claimed = await claim(store, 2 * n)
        assert len(claimed.jobs) == 2 * n
        await finish(store, claimed)
        counts.append(len([s for s in executed if not s.lstrip().upper().startswith(
            ("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE"))]))  # fmt: skip
    assert counts[0] == counts[1], counts
    await queue(store, "plain", 2, key_id="key_unlimited")
    with statements() as executed:
        assert len((await claim(store, 2)).jobs) == 2
    assert len([s for s in executed if "api_keys" in s]) == 1  # only the walk's look


# SQLite only: PostgreSQL plans from the statistics its autovacuum keeps.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_claim_never_walks_a_limited_tenants_finished_jobs(
    store: SQLStore, database_url: str
) -> None:
    """Counting a limited tenant's running jobs must not read its history: on a SQLite file
    without ANALYZE statistics (every gateway's, as SQLite gathers none by itself) a
    ``tenant IN (...)`` filter made the planner walk ix_jobs_tenant_id, every finished job of
    the tenant, on every claim: 60 ms a claim at 300,000 jobs. Checked by the plan of every
    statement a limited claim runs, so the figure of no machine matters."""
    import sqlite3

    limited = FairPolicy(
        tenants={"a": TenantLimits(max_concurrency=2), "b": TenantLimits(max_concurrency=3)}
    )
    await queue(store, "a", 4)
    await queue(store, "b", 4)
    with statements_and_parameters() as executed:
        assert len((await claim(store, 8, limited)).jobs) == 5
    reads = [(s, p) for s, p in executed if s.lstrip().upper().startswith(("SELECT", "WITH"))]
    assert any("GROUP BY jobs.tenant" in s for s, _ in reads), "the running count was not seen"
    path = database_url.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for statement, parameters in reads:
            plan = [row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + statement, parameters)]
            assert not any("ix_jobs_tenant_id" in step for step in plan), (statement, plan)


@contextlib.contextmanager
def statements_and_parameters() -> Iterator[list[tuple[str, Any]]]:
    executed: list[tuple[str, Any]] = []

    def keep(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        executed.append((statement, parameters))

    sa.event.listen(sa.Engine, "before_cursor_execute", keep)
    try:
        yield executed
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", keep)
