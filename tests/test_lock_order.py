"""PostgreSQL: transactions that touch several jobs' rows take their locks in one order (job id), so a
worker's lease renewal and its event appends never deadlock each other."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from hookline.events import EventType, NewEvent
from hookline.jobs import JobStatus
from hookline.store import SQLStore, open_store
from tests.test_store import NOW, QUEUED, make_job


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[SQLStore]:
    store = await open_store(postgres_url)
    yield store
    await store.close()


async def _locks_waiting(conn: asyncpg.Connection, count: int) -> None:
    """Until ``count`` other sessions wait for a lock."""
    for _ in range(200):
        await conn.execute("SELECT pg_stat_clear_snapshot()")  # fresh figures, in a transaction too
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        )
        if waiting >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {count} sessions ever waited for a lock")


async def test_renewing_leases_and_appending_events_do_not_deadlock(
    store: SQLStore, postgres_url: str
) -> None:
    first, second = (  # ids in this order
        make_job(status=JobStatus.RUNNING, lease_token="lease_w", attempts=1) for _ in range(2)
    )
    assert first.id < second.id
    await store.insert_jobs([(first, QUEUED), (second, QUEUED)])
    other = await asyncpg.connect(postgres_url.replace("postgresql://", "postgres://"))
    try:
        blocker = other.transaction()
        await blocker.start()
        await other.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", first.id)
        # The renewal waits for the first row; then appends to both jobs, listed second first.
        renew = asyncio.create_task(
            store.renew_leases([second.id, first.id], "lease_w", NOW + 60_000, NOW)
        )
        await _locks_waiting(other, 1)
        log = [NewEvent(EventType.LOG, {"level": "info", "message": "x"})]
        append = asyncio.create_task(
            store.append_events_many([(second.id, "lease_w", log), (first.id, "lease_w", log)], NOW)
        )
        await _locks_waiting(other, 2)
        await blocker.rollback()  # had either held one row while waiting for the other: deadlock
        renewed, appended = await asyncio.wait_for(asyncio.gather(renew, append), 20)
    finally:
        await other.close()
    assert renewed == {first.id, second.id}
    assert [a is not None and len(a.events) for a in appended] == [1, 1]
