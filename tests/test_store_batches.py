"""The contract of :class:`~hookline.store.base_batches.Batches`: what each operation's
docstring promises, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hookline.events import EventType, NewEvent
from hookline.ids import new_id
from hookline.jobs import Job, JobStatus, Operation
from hookline.store import Batches, BatchRecord, BatchStatus, FileRecord, Store, open_store
from hookline.store.base_batches import (
    ACTIVE_STATUSES,
    ALLOWED_TRANSITIONS,
    TERMINAL_STATUSES,
    sources_for,
)
from tests.test_store import NOW, QUEUED, make_job

LEASE = 30_000
MiB = 1024 * 1024


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = await open_store(database_url)
    yield store
    await store.close()


@pytest.fixture
def batches(store: Store) -> Batches:
    return store.batches


async def pieces(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def content(batches: Batches, file_id: str) -> bytes:
    return b"".join([chunk async for chunk in batches.read_file(file_id)])


def file_record(tenant: str = "acme", purpose: str = "batch") -> FileRecord:
    return FileRecord(new_id("file"), tenant, purpose, "input.jsonl", 0, NOW)


def batch_row(
    tenant: str = "acme", status: BatchStatus = BatchStatus.VALIDATING, **changes: Any
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": new_id("batch"), "tenant": tenant, "status": status.value,
        "endpoint": "/v1/chat/completions", "input_file_id": "file_x", "output_file_id": None,
        "error_file_id": None, "completion_window": "24h", "metadata": {"team": "x"},
        "errors": None, "item_events": [], "total": 5, "completed": 0, "failed": 0,
        "lines_queued": 0, "created_at": NOW, "updated_at": NOW, "expires_at": NOW + 86_400_000,
        "in_progress_at": None, "finalizing_at": None, "completed_at": None, "failed_at": None,
        "expired_at": None, "cancelling_at": None, "cancelled_at": None, "progress_at": None,
        "lease_token": None, "lease_expires_at": None,
    }  # fmt: skip
    row.update(changes)
    return row


def anchor_of(row: dict[str, Any]) -> Job:
    """The job row that carries a batch's events (as hookline.batches writes it)."""
    return make_job(
        row["tenant"], id=row["id"], status=JobStatus.RUNNING, operation=Operation.BATCH,
        model="", upstream="", input={}, metadata={}, attempts=1, max_attempts=1,
        started_at=NOW, lease_token="batch", event_seq=0,
    )  # fmt: skip


async def new_batch(batches: Batches, **changes: Any) -> BatchRecord:
    row = batch_row(**changes)
    await batches.insert_batch(row, anchor_of(row))
    found = await batches.get_batch(row["id"])
    assert found is not None
    return found


async def add_items(store: Store, batch: BatchRecord, lines: list[int], **changes: Any) -> None:
    items = [
        make_job(batch.tenant, batch_id=batch.id, batch_line=n, custom_id=f"c{n}", **changes)
        for n in lines
    ]
    await store.insert_jobs([(item, QUEUED) for item in items])


# --- files


async def test_a_file_is_stored_and_read_back_as_it_came(batches: Batches) -> None:
    data = bytes(range(256)) * (4 * MiB // 256) + b"the end"  # more than one read of chunks
    parts = [data[i : i + 700_001] for i in range(0, len(data), 700_001)]
    record = file_record()
    stored = await batches.create_file(record, pieces(*parts), max_bytes=len(data))
    assert stored is not None
    assert stored.bytes == len(data) and stored.id == record.id and stored.tenant == "acme"
    assert await content(batches, record.id) == data
    assert await batches.get_file("acme", record.id) == stored
    assert await batches.get_file("globex", record.id) is None


async def test_a_file_over_the_limit_is_not_kept(batches: Batches) -> None:
    record = file_record()
    assert await batches.create_file(record, pieces(b"x" * 60, b"y" * 40), max_bytes=99) is None
    assert await batches.get_file("acme", record.id) is None
    assert await content(batches, record.id) == b""
    assert await batches.list_files("acme", None, None, 10) == []


async def test_a_file_whose_chunks_fail_is_not_kept(batches: Batches) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"x" * (MiB + 1)  # a whole chunk written before the failure
        raise RuntimeError("the upload broke off")

    record = file_record()
    with pytest.raises(RuntimeError, match="broke off"):
        await batches.create_file(record, failing(), max_bytes=10 * MiB)
    assert await batches.get_file("acme", record.id) is None
    assert await content(batches, record.id) == b""


async def test_write_file_stores_without_a_limit(batches: Batches) -> None:
    written = await batches.write_file(file_record(purpose="batch_output"), pieces(b"ab", b"c"))
    assert written.bytes == 3
    assert await content(batches, written.id) == b"abc"


async def test_an_unknown_file_reads_as_nothing(batches: Batches) -> None:
    assert await content(batches, "file_unknown") == b""


async def test_files_are_listed_newest_first(batches: Batches) -> None:
    made = []
    for purpose in ("batch", "batch_output", "batch"):
        made.append(await batches.write_file(file_record(purpose=purpose), pieces(b"x")))
    await batches.write_file(file_record("globex"), pieces(b"x"))
    newest_first = made[::-1]
    assert await batches.list_files("acme", None, None, 10) == newest_first
    assert await batches.list_files("acme", "batch", None, 10) == [made[2], made[0]]
    assert await batches.list_files("acme", None, newest_first[0].id, 10) == newest_first[1:]
    assert await batches.list_files("acme", None, None, 1) == newest_first[:1]
    assert len(await batches.list_files("globex", None, None, 10)) == 1


async def test_a_deleted_file_is_gone_with_its_content(batches: Batches) -> None:
    written = await batches.write_file(file_record(), pieces(b"x" * (MiB + 5)))
    assert not await batches.delete_file("globex", written.id)
    assert await batches.delete_file("acme", written.id)
    assert await batches.get_file("acme", written.id) is None
    assert await content(batches, written.id) == b""
    assert not await batches.delete_file("acme", written.id)


# --- batches


async def test_a_batch_is_stored_with_its_anchor(store: Store, batches: Batches) -> None:
    row = batch_row()
    anchor = anchor_of(row)
    await batches.insert_batch(row, anchor)
    stored = await batches.get_batch(row["id"])
    assert stored == BatchRecord.from_row(row)
    assert stored.status is BatchStatus.VALIDATING and stored.metadata == {"team": "x"}
    assert await batches.get_batch(row["id"], "acme") == stored
    assert await batches.get_batch(row["id"], "globex") is None
    assert await batches.get_batch("batch_unknown") is None
    assert await store.get_job(row["id"]) == anchor


async def test_batches_are_listed_newest_first(batches: Batches) -> None:
    made = [await new_batch(batches) for _ in range(3)]
    await new_batch(batches, tenant="globex")
    newest_first = made[::-1]
    assert await batches.list_batches("acme", None, 10) == newest_first
    assert await batches.list_batches("acme", newest_first[0].id, 10) == newest_first[1:]
    assert await batches.list_batches("acme", None, 2) == newest_first[:2]
    assert len(await batches.list_batches("globex", None, 10)) == 1


async def test_an_update_changes_fields_but_never_the_status(batches: Batches) -> None:
    batch = await new_batch(batches, status=BatchStatus.IN_PROGRESS)
    updated = await batches.update_batch(batch.id, {"completed": 3, "updated_at": NOW + 1})
    assert updated is not None
    assert (updated.completed, updated.updated_at, updated.status) == (
        3,
        NOW + 1,
        BatchStatus.IN_PROGRESS,
    )
    assert await batches.get_batch(batch.id) == updated
    assert await batches.update_batch("batch_unknown", {"completed": 1}) is None
    with pytest.raises(ValueError):
        await batches.update_batch(batch.id, {"status": BatchStatus.COMPLETED.value})
    assert await batches.get_batch(batch.id) == updated


async def test_a_status_changes_only_along_the_allowed_transitions(batches: Batches) -> None:
    for old, new in itertools.product(BatchStatus, BatchStatus):
        batch = await new_batch(batches, status=old)
        moved = await batches.transition(batch.id, new, {"updated_at": NOW + 1, "failed": 2})
        if new in ALLOWED_TRANSITIONS.get(old, ()):
            assert moved is not None, (old, new)
            assert (moved.status, moved.updated_at, moved.failed) == (new, NOW + 1, 2)
            assert await batches.get_batch(batch.id) == moved
        else:
            assert moved is None, (old, new)
            assert await batches.get_batch(batch.id) == batch
    assert await batches.transition("batch_unknown", BatchStatus.FAILED, {}) is None


def test_the_lifecycle_ends_in_the_terminal_statuses() -> None:
    """The table itself: every active status can end, no terminal one can change."""
    lifecycle = [
        BatchStatus.VALIDATING,
        BatchStatus.IN_PROGRESS,
        BatchStatus.FINALIZING,
        BatchStatus.COMPLETED,
    ]
    for old, new in itertools.pairwise(lifecycle):
        assert new in ALLOWED_TRANSITIONS[old]
    assert sources_for(BatchStatus.CANCELLING) == {
        BatchStatus.VALIDATING,
        BatchStatus.IN_PROGRESS,
    }
    assert all(BatchStatus.FAILED in ALLOWED_TRANSITIONS[s] for s in ACTIVE_STATUSES)
    assert all(s not in ALLOWED_TRANSITIONS and s.is_terminal for s in TERMINAL_STATUSES)
    assert not any(s.is_terminal for s in ACTIVE_STATUSES)


async def test_any_in_says_whether_some_batch_is_in_a_status(batches: Batches) -> None:
    assert not await batches.any_in(ACTIVE_STATUSES)
    await new_batch(batches, status=BatchStatus.IN_PROGRESS)
    assert await batches.any_in(ACTIVE_STATUSES)
    assert await batches.any_in([BatchStatus.IN_PROGRESS])
    assert not await batches.any_in([BatchStatus.CANCELLING, BatchStatus.COMPLETED])


async def test_one_runner_at_a_time_leases_a_batch(batches: Batches) -> None:
    running = await new_batch(batches, status=BatchStatus.IN_PROGRESS)
    validating = await new_batch(batches, status=BatchStatus.VALIDATING)
    await new_batch(batches, status=BatchStatus.COMPLETED)
    mine = {running.id, validating.id}

    async def claim(token: str, now: int, statuses: Any = ACTIVE_STATUSES) -> set[str]:
        return {b.id for b in await batches.claim_batches(statuses, now, token, now + LEASE)}

    assert await claim("run_a", NOW) == mine
    assert await claim("run_b", NOW + 1) == set()
    assert await claim("run_a", NOW + 2) == mine  # renewed, until NOW + 2 + LEASE
    assert await claim("run_b", NOW + 2 + LEASE) == set()
    assert await claim("run_b", NOW + 3 + LEASE, [BatchStatus.IN_PROGRESS]) == {running.id}
    assert await claim("run_b", NOW + 3 + LEASE) == mine
    await batches.release_batches("run_other")  # not its lease: nothing changes
    assert await claim("run_c", NOW + 4 + LEASE) == set()
    await batches.release_batches("run_b")
    assert await claim("run_c", NOW + 4 + LEASE) == mine


async def test_lapse_all_leases_frees_leased_batches(store: Store, batches: Batches) -> None:
    batch = await new_batch(batches, status=BatchStatus.IN_PROGRESS)
    assert await batches.claim_batches(ACTIVE_STATUSES, NOW, "run_a", NOW + LEASE)
    assert await store.lapse_all_leases(NOW + 1) >= 1
    [taken] = await batches.claim_batches(ACTIVE_STATUSES, NOW + 1, "run_b", NOW + 1 + LEASE)
    assert taken.id == batch.id


async def test_a_batchs_items_are_counted_listed_and_found_queued(
    store: Store, batches: Batches
) -> None:
    batch = await new_batch(batches, status=BatchStatus.IN_PROGRESS)
    other = await new_batch(batches, status=BatchStatus.IN_PROGRESS)
    await add_items(store, batch, [3, 1, 5, 2, 4])
    await add_items(store, other, [1, 2])
    [second] = await batches.items(batch.id, 1, 1)
    assert second.batch_line == 2 and second.custom_id == "c2"
    cancelled = await store.transition(
        second.id, JobStatus.CANCELLED, now=NOW + 1, events=[NewEvent(EventType.CANCELLED, {})]
    )
    assert cancelled is not None
    assert await batches.item_counts(batch.id) == {"queued": 4, "cancelled": 1}
    assert await batches.item_counts("batch_unknown") == {}
    assert [j.batch_line for j in await batches.items(batch.id, 0, 2)] == [1, 2]
    assert [j.batch_line for j in await batches.items(batch.id, 2, 10)] == [3, 4, 5]
    assert {j.batch_id for j in await batches.items(batch.id, 0, 10)} == {batch.id}
    queued = await batches.queued_item_ids(batch.id, 10)
    everything = {j.id for j in await batches.items(batch.id, 0, 10)}
    assert set(queued) == everything - {second.id} and len(queued) == 4
    assert set(await batches.queued_item_ids(batch.id, 2)) < set(queued)


async def test_batches_that_ended_without_their_event_are_found(
    store: Store, batches: Batches
) -> None:
    ended = await new_batch(batches, status=BatchStatus.COMPLETED)
    await new_batch(batches, status=BatchStatus.IN_PROGRESS)
    reported = await new_batch(batches, status=BatchStatus.FAILED)
    finished = await store.transition(
        reported.id,
        JobStatus.FAILED,
        now=NOW + 1,
        changes={"finished_at": NOW + 1, "lease_token": None},
        events=[NewEvent(EventType.BATCH_FAILED, {})],
    )
    assert finished is not None
    assert [b.id for b in await batches.ended_without_event()] == [ended.id]


async def test_a_batch_is_taken_back_whole(store: Store, batches: Batches) -> None:
    hook = {"url": "http://receiver.example/hook", "events": ["*"]}
    doomed = await new_batch(batches)
    kept = await new_batch(batches)
    await add_items(store, doomed, [1, 2], webhook=hook)
    await add_items(store, kept, [1], webhook=hook)
    doomed_items = await batches.items(doomed.id, 0, 10)
    [kept_item] = await batches.items(kept.id, 0, 10)
    assert len(await store.webhooks.list_deliveries("acme")) == 3
    await batches.delete_batch(doomed.id)
    assert await batches.get_batch(doomed.id) is None
    assert await store.get_job(doomed.id) is None
    for item in doomed_items:
        assert await store.get_job(item.id) is None
        assert await store.list_events(item.id) == []
    assert [d.job_id for d in await store.webhooks.list_deliveries("acme")] == [kept_item.id]
    assert await batches.get_batch(kept.id) == kept
    assert await store.get_job(kept.id) is not None
    assert len(await store.list_events(kept_item.id)) == 1


async def test_the_provider_batch_ids_parts_recorded_are_known_per_upstream(
    batches: Batches,
) -> None:
    """What a lookup for a lost creation must not take: the ids other parts recorded."""
    batch = await new_batch(batches)

    def part(n: int, upstream: str) -> dict[str, Any]:
        return {
            "id": f"{batch.id}.{n}", "batch_id": batch.id, "part": n, "upstream": upstream,
            "first_line": n + 1, "last_line": n + 1, "requests": 1, "state": "pending",
            "provider_status": None, "provider_batch_id": None, "provider_file_id": None,
            "output_file_id": None, "error_file_id": None, "results_url": None,
            "completed": 0, "failed": 0, "errors": None, "stop": None, "stop_sent": False,
            "creating_at": None, "next_poll_at": NOW, "poll_ms": 1000, "polls": 0,
            "created_at": NOW, "updated_at": NOW,
        }  # fmt: skip

    await batches.insert_parts([part(0, "claude"), part(1, "claude"), part(2, "openai")])
    assert await batches.provider_batch_ids("claude") == set()
    await batches.update_part(f"{batch.id}.0", {"provider_batch_id": "msgbatch_a"})
    await batches.update_part(f"{batch.id}.2", {"provider_batch_id": "batch_b"})
    assert await batches.provider_batch_ids("claude") == {"msgbatch_a"}
    assert await batches.provider_batch_ids("openai") == {"batch_b"}
