"""The storage contract: the same assertions on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection

from hookline.errors import InvalidRequest, StoreError, StoreUnavailable
from hookline.events import EventType, NewEvent
from hookline.ids import new_id
from hookline.jobs import Job, JobStatus, Operation
from hookline.store import SQLStore, open_store, schema

NOW = 1_800_000_000_000


def make_job(
    tenant: str = "acme", *, priority: int = 0, key: str | None = None, **changes: object
) -> Job:
    job = Job(
        id=new_id("job"),
        tenant=tenant,
        status=JobStatus.QUEUED,
        operation=Operation.CHAT_COMPLETIONS,
        model="m",
        upstream="u",
        input={"messages": [{"role": "user", "content": "hi"}]},
        output=None,
        error=None,
        metadata={"team": "x"},
        priority=priority,
        attempts=0,
        max_attempts=3,
        idempotency_key=key,
        request_hash="h" if key else None,
        created_at=NOW,
        updated_at=NOW,
        started_at=None,
        finished_at=None,
        expires_at=None,
        run_after=NOW,
        lease_token=None,
        lease_expires_at=None,
        event_seq=1,
    )
    return job.evolve(**changes) if changes else job


QUEUED = NewEvent(EventType.QUEUED, {})


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SQLStore]:
    store = await open_store(database_url)
    yield store
    await store.close()


async def claim(
    store: SQLStore, limit: int = 10, now: int = NOW, token: str = "lease_a"
) -> list[Job]:
    claimed = await store.claim_jobs(
        "u", limit, now=now, lease_token=token, lease_expires_at=now + 30_000
    )
    return [c.job for c in claimed.jobs]


async def test_insert_and_read_back(store: SQLStore) -> None:
    job = make_job()
    [outcome] = await store.insert_jobs([(job, QUEUED)])
    assert not outcome.duplicate
    assert await store.get_job(job.id) == job
    assert await store.get_job(job.id, "acme") == job
    assert await store.get_job(job.id, "globex") is None
    [event] = await store.list_events(job.id)
    assert event.type is EventType.QUEUED and event.tenant == "acme" and event.seq == 1


async def test_batch_with_a_duplicate_key_inserts_the_rest(store: SQLStore) -> None:
    first = make_job(key="k1")
    await store.insert_jobs([(first, QUEUED)])
    batch = [make_job(), make_job(key="k1"), make_job(key="k2"), make_job("globex", key="k1")]
    outcomes = await store.insert_jobs([(job, QUEUED) for job in batch])
    assert [o.duplicate for o in outcomes] == [False, True, False, False]
    assert await store.get_job(batch[1].id) is None
    assert (await store.find_job_by_idempotency_key("acme", "k1")) == first
    assert len(await store.list_jobs("acme")) == 3


async def test_a_clash_other_than_a_reused_key_is_an_error_not_a_duplicate(
    store: SQLStore,
) -> None:
    first = make_job(key="k1")
    await store.insert_jobs([(first, QUEUED)])
    for clash in (make_job(id=first.id), make_job(id=first.id, key="k2")):  # the same job id
        with pytest.raises(StoreError):
            await store.insert_jobs([(clash, QUEUED)])
    with pytest.raises(StoreError):
        await store.insert_jobs([(make_job(), QUEUED), (make_job(id=first.id), QUEUED)])
    for clash in (make_job(id=first.id), make_job(id=first.id, key="k2")):  # one accept at a time
        with pytest.raises(StoreError):
            await store.accept_job(clash, [QUEUED], None)
    assert (await store.accept_job(make_job(key="k1"), [QUEUED], None)).duplicate
    assert await store.list_jobs("acme") == [first]  # nothing of the failed writes stayed


async def test_claim_takes_priority_then_fifo_and_skips_future_and_expired(store: SQLStore) -> None:
    low_old = make_job()
    high = make_job(priority=5)
    low_new = make_job()
    later = make_job(run_after=NOW + 60_000)
    expired = make_job(expires_at=NOW - 1)
    other_upstream = make_job(upstream="v")
    await store.insert_jobs(
        [(j, QUEUED) for j in (low_old, high, low_new, later, expired, other_upstream)]
    )
    claimed = await claim(store)
    assert [j.id for j in claimed] == [high.id, low_old.id, low_new.id]
    for job in claimed:
        assert job.status is JobStatus.RUNNING and job.attempts == 1 and job.event_seq == 2
        assert job.lease_token == "lease_a" and job.started_at == NOW
        assert [e.type for e in await store.list_events(job.id)] == [
            EventType.QUEUED,
            EventType.STARTED,
        ]
    assert await claim(store) == []
    assert [j.id for j in await claim(store, now=NOW + 60_000)] == [later.id]
    assert await store.ids_past_ttl(NOW, 10) == [expired.id]


async def test_concurrent_claims_never_share_a_job(store: SQLStore) -> None:
    jobs = [make_job() for _ in range(40)]
    await store.insert_jobs([(j, QUEUED) for j in jobs])
    results = await asyncio.gather(*(claim(store, 7, token=f"lease_{i}") for i in range(8)))
    claimed = [job.id for batch in results for job in batch]
    assert sorted(claimed) == sorted(j.id for j in jobs)


async def test_transition_is_conditional_so_one_terminal_event_wins(store: SQLStore) -> None:
    job = make_job()
    await store.insert_jobs([(job, QUEUED)])
    [running] = await claim(store)
    cancelled = await store.transition(
        job.id,
        JobStatus.CANCELLED,
        now=NOW,
        events=[NewEvent(EventType.CANCELLED, {})],
        tenant="acme",
    )
    assert cancelled is not None and cancelled.job.status is JobStatus.CANCELLED
    assert cancelled.events[0].seq == 3
    succeeded = await store.transition(
        job.id,
        JobStatus.SUCCEEDED,
        now=NOW,
        changes={"output": {"x": 1}},
        events=[NewEvent(EventType.SUCCEEDED, {})],
        lease_token=running.lease_token,
    )
    assert succeeded is None
    final = await store.get_job(job.id)
    assert final is not None and final.status is JobStatus.CANCELLED and final.output is None
    types = [e.type for e in await store.list_events(job.id)]
    assert types == [EventType.QUEUED, EventType.STARTED, EventType.CANCELLED]


async def test_a_cancelled_attempt_keeps_its_output_so_far(store: SQLStore) -> None:
    job, other = make_job(), make_job()
    await store.insert_jobs([(job, QUEUED), (other, QUEUED)])
    await claim(store)
    partial = {"object": "chat.completion", "choices": [{"index": 0, "text": "hal"}]}
    # Not while it runs (a lease lost to a take-over), nor for an attempt that is not its last.
    assert not await store.keep_cancelled_output(job.id, 1, partial, (3, 1), NOW)
    await store.transition(job.id, JobStatus.CANCELLED, now=NOW, tenant="acme",
                           events=[NewEvent(EventType.CANCELLED, {})])  # fmt: skip
    assert not await store.keep_cancelled_output(job.id, 2, partial, None, NOW)
    assert await store.keep_cancelled_output(job.id, 1, partial, (3, 1), NOW + 5)
    kept = await store.get_job(job.id)
    assert kept is not None and kept.output == partial and kept.updated_at == NOW + 5
    assert (kept.input_tokens, kept.output_tokens) == (3, 1)
    assert kept.status is JobStatus.CANCELLED  # and no event: job.cancelled came already
    assert [e.type for e in await store.list_events(job.id)][-1] is EventType.CANCELLED
    assert (await store.get_job(other.id)).output is None  # type: ignore[union-attr]


async def test_foreign_tenant_cannot_transition(store: SQLStore) -> None:
    job = make_job()
    await store.insert_jobs([(job, QUEUED)])
    assert await store.transition(job.id, JobStatus.CANCELLED, now=NOW, tenant="globex") is None
    assert (await store.get_job(job.id)).status is JobStatus.QUEUED  # type: ignore[union-attr]


async def test_delete_job_takes_one_finished_job_of_its_tenant(store: SQLStore) -> None:
    job, running = make_job(), make_job()
    await store.insert_jobs([(job, QUEUED), (running, QUEUED)])
    assert not await store.delete_job(job.id, "acme")  # queued: not finished
    await store.transition(job.id, JobStatus.CANCELLED, now=NOW, changes={"finished_at": NOW},
                           events=[NewEvent(EventType.CANCELLED, {})], tenant="acme")  # fmt: skip
    assert not await store.delete_job(job.id, "globex")  # another tenant's
    assert await store.delete_job(job.id, "acme")
    assert await store.get_job(job.id) is None and await store.list_events(job.id) == []
    assert not await store.delete_job(job.id, "acme")  # gone
    assert await store.get_job(running.id) is not None  # the others stay


async def test_events_need_the_current_lease(store: SQLStore) -> None:
    job = make_job()
    await store.insert_jobs([(job, QUEUED)])
    await claim(store, token="lease_a")
    deltas = [NewEvent(EventType.OUTPUT_DELTA, {"text": t}) for t in ("a", "b")]
    appended = await store.append_events(job.id, "lease_a", deltas, NOW)
    assert appended is not None and [e.seq for e in appended.events] == [3, 4]
    assert await store.append_events(job.id, "lease_b", deltas, NOW) is None
    assert len(await store.list_events(job.id)) == 4
    assert [e.seq for e in await store.list_events(job.id, after_seq=2)] == [3, 4]
    started = await store.list_events(job.id, types=[EventType.STARTED, EventType.LOG])
    assert [(e.seq, e.type) for e in started] == [(2, EventType.STARTED)]


async def test_leases_renew_and_lapse(store: SQLStore) -> None:
    a, b = make_job(), make_job()
    await store.insert_jobs([(a, QUEUED), (b, QUEUED)])
    await claim(store, token="lease_a")
    held = await store.renew_leases([a.id, b.id], "lease_a", NOW + 90_000, NOW)
    assert held == {a.id, b.id}
    assert await store.renew_leases([a.id], "lease_other", NOW + 90_000, NOW) == set()
    assert await store.lapsed_leases(NOW + 60_000, 10) == []
    lapsed = await store.lapsed_leases(NOW + 90_001, 10)
    assert {j.id for j in lapsed} == {a.id, b.id}


async def test_list_is_per_tenant_newest_first_with_filters(store: SQLStore) -> None:
    jobs = [make_job() for _ in range(5)] + [make_job("globex")]
    embed = make_job(operation=Operation.EMBEDDINGS)
    await store.insert_jobs([(j, QUEUED) for j in [*jobs, embed]])
    listed = await store.list_jobs("acme", limit=3)
    assert [j.id for j in listed] == [embed.id, jobs[4].id, jobs[3].id]
    older = await store.list_jobs("acme", before_id=jobs[3].id)
    assert [j.id for j in older] == [jobs[2].id, jobs[1].id, jobs[0].id]
    assert [j.id for j in await store.list_jobs("acme", operations=["embeddings"])] == [embed.id]
    assert await store.list_jobs("acme", statuses=[JobStatus.RUNNING]) == []
    assert [j.id for j in await store.list_jobs("globex")] == [jobs[5].id]


async def test_unreachable_database_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable):
        await open_store("postgresql://nobody@127.0.0.1:1/none")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_sqlite_write_waits_for_another_process_without_blocking_the_loop(
    store: SQLStore, database_url: str
) -> None:
    other = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process is writing
    job = make_job()
    insert = asyncio.create_task(store.insert_jobs([(job, QUEUED)]))
    ticks = 0
    for _ in range(20):  # the event loop keeps running while the insert waits for the lock
        await asyncio.sleep(0.01)
        ticks += 1
    assert not insert.done() and ticks == 20
    other.execute("COMMIT")
    other.close()
    [outcome] = await insert
    assert not outcome.duplicate and await store.get_job(job.id) == job


async def test_writes_at_once_are_committed_apart_from_a_failing_one(store: SQLStore) -> None:
    """Writes issued together may share a transaction (SQLite runs them as one, each in a
    savepoint): a write that fails is undone alone, and its caller alone gets the error."""
    jobs_ = [make_job() for _ in range(6)]
    taken = make_job(key="same")
    await store.insert_jobs([(taken, QUEUED)])

    def failing(conn: Connection) -> None:
        conn.execute(sa.insert(schema.jobs), [make_job().as_row()])  # undone with the failure
        raise InvalidRequest("this write is refused")

    results = await asyncio.gather(
        *(store.insert_jobs([(job, QUEUED)]) for job in jobs_[:3]),
        store.database.write(failing),
        store.insert_jobs([(make_job(key="same"), QUEUED)]),  # an idempotency-key conflict
        *(store.insert_jobs([(job, QUEUED)]) for job in jobs_[3:]),
        return_exceptions=True,
    )
    assert isinstance(results[3], InvalidRequest)
    duplicate = results[4]
    assert isinstance(duplicate, list) and [o.duplicate for o in duplicate] == [True]
    for job in jobs_:
        assert await store.get_job(job.id) == job
    everyone = await store.database.read(
        lambda conn: conn.execute(sa.select(sa.func.count()).select_from(schema.jobs)).scalar()
    )
    assert everyone == len(jobs_) + 1
