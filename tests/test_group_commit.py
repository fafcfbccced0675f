"""Writes made at once are committed together, on both databases: grouped writes (accepting a job)
run their items in one call, a bad item fails alone, and a burst of lone writes in a quiet
process still groups (a commit in the event loop must not serialise a burst)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection

from hookline.errors import InvalidRequest, StoreError
from hookline.store import SQLStore, open_store, schema
from hookline.store.database import GroupedWrite, SQLiteDatabase
from tests.test_store import QUEUED, make_job


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SQLStore]:
    store = await open_store(database_url)
    yield store
    await store.close()


def _counting_insert(calls: list[int]) -> GroupedWrite[str, str]:
    """Inserts a job per item (an item "bad" fails its call), recording each call's size."""

    def run(conn: Connection, items: list[str]) -> list[str]:
        calls.append(len(items))
        if "bad" in items:
            raise InvalidRequest("a bad item")
        conn.execute(sa.insert(schema.jobs), [make_job(id=item).as_row() for item in items])
        return [f"ok {item}" for item in items]

    return GroupedWrite("test-insert", run)


async def _count_jobs(store: SQLStore) -> int:
    count = await store.database.read(
        lambda conn: conn.execute(sa.select(sa.func.count()).select_from(schema.jobs)).scalar()
    )
    return int(count or 0)


async def test_items_written_at_once_go_in_few_calls_and_a_bad_one_fails_alone(
    store: SQLStore,
) -> None:
    calls: list[int] = []
    group = _counting_insert(calls)
    items = [f"job_{i:03d}" for i in range(40)]
    items.insert(17, "bad")
    results = await asyncio.gather(
        *(store.database.write_grouped(group, item) for item in items), return_exceptions=True
    )
    assert isinstance(results[17], StoreError | InvalidRequest)
    assert [r for i, r in enumerate(results) if i != 17] == [f"ok {i}" for i in items if i != "bad"]
    assert await _count_jobs(store) == 40
    # The first item is written at once by its caller; the rest wait for it and go together
    # (then, once the bad item is in their call, one at a time to find it).
    assert calls[0] == 1 and max(calls) >= 10


async def test_a_burst_of_lone_writes_in_a_quiet_process_is_grouped(store: SQLStore) -> None:
    """Each caller finds the database idle and would write at once; were every lone write
    committed in the event loop (it is quiet: no job runs), none would ever see another waiting,
    and a burst of N accepts would cost N commits."""
    if isinstance(store.database, SQLiteDatabase):
        store.database.quiet = lambda: True
    calls: list[int] = []
    group = _counting_insert(calls)

    async def one_request(i: int) -> str:
        await asyncio.sleep(0)  # each as its own task, as HTTP requests are
        return await store.database.write_grouped(group, f"job_{i:03d}")

    await asyncio.gather(*(one_request(i) for i in range(100)))
    assert await _count_jobs(store) == 100
    assert len(calls) <= 10, calls


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_lone_write_in_a_quiet_process_commits_without_the_writer_thread(
    store: SQLStore,
) -> None:
    """The single-caller fast path: no hand-off to a thread for a write nobody else waits for."""
    database = store.database
    assert isinstance(database, SQLiteDatabase)
    database.quiet = lambda: True
    await asyncio.sleep(0.01)  # nothing written just before
    handed_off: list[object] = []
    real = database._writer.submit

    def spy(*args: object, **kwargs: object) -> object:
        handed_off.append(args[0])
        return real(*args, **kwargs)  # type: ignore[arg-type]

    database._writer.submit = spy  # type: ignore[method-assign,assignment]
    await store.accept_job(make_job(), [QUEUED], None)
    assert handed_off == []
