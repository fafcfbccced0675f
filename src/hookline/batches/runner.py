"""The batch runner, in every worker process: it leases the active batches, one runner each,
counts their items, records throttled progress, cancels what a cancelled or expired batch has
queued, and once every item has ended writes the result files and the terminal event."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from hookline.batches.format import batch_json, result_line
from hookline.batches.provider import ProviderBatches
from hookline.batches.service import BATCHES_CHANGED, TERMINAL_EVENTS, BatchService, Unqueueable
from hookline.errors import StoreError, StoreUnavailable
from hookline.ids import new_id
from hookline.jobs import JobStatus
from hookline.store.base_batches import (
    ACTIVE_STATUSES,
    BatchRecord,
    BatchStatus,
    FileRecord,
)
from hookline.upstreams.provider_batches import ProviderBatchAPI

log = logging.getLogger("hookline.batches")


class BatchRunner:
    """Drives the active batches (one runner per batch at a time, by lease)."""

    def __init__(
        self, service: BatchService, providers: Mapping[str, ProviderBatchAPI] | None = None
    ) -> None:
        self.service = service
        # The upstreams' own batch APIs, for the batches whose items run there.
        self.providers = ProviderBatches(service, providers or {})
        self.store = service.store
        self.clock = service.clock
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._unsubscribe: Any = None
        self.lease_token = new_id("lease")

    async def start(self) -> None:
        notifier = self.service.queue.notifier
        self._unsubscribe = notifier.subscribe(BATCHES_CHANGED, lambda _: self._wake.set())
        self._task = asyncio.create_task(self._loop(), name="hookline-batches")

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(StoreError):  # else its batches wait for the lease to lapse
            await self.store.release_batches(self.lease_token)
        await self.providers.close()

    async def _loop(self) -> None:
        config = self.service.config
        while True:
            try:
                await self.tick(self.lease_token)
            except StoreError as exc:
                log.warning("batch runner: %s", exc)
            except Exception:
                log.exception("batch runner failed; retrying")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(config.poll_seconds):
                    await self._wake.wait()

    async def tick(self, token: str) -> None:
        """One pass over the batches this runner holds (or can take)."""
        if await self.store.any_in(ACTIVE_STATUSES):  # most of the time none: no write then
            now = self.clock.now_ms()
            lease = now + int(self.service.config.lease_seconds * 1000)
            for batch in await self.store.claim_batches(ACTIVE_STATUSES, now, token, lease):
                try:
                    await self._drive(batch, token)
                except StoreUnavailable:
                    raise  # for every batch alike: the next tick
                except Exception as exc:  # this batch's own trouble: the others go on
                    bug = not isinstance(exc, StoreError)
                    log.warning("batch runner: batch %s: %s", batch.id, exc, exc_info=bug)
        await self._repair_terminal_events()

    async def _drive(self, batch: BatchRecord, token: str) -> None:
        service = self.service
        now = self.clock.now_ms()
        if batch.status is BatchStatus.VALIDATING:
            if now - batch.updated_at < service.config.lease_seconds * 1000:
                return  # its API request is still writing the items
            try:
                batch = await service.queue_items(batch.id)
            except StoreUnavailable:
                raise  # the database is away: the next tick tries again
            except Exception as exc:
                await self._fail_unqueued(batch, exc)
                return
        if batch.status is BatchStatus.IN_PROGRESS and now >= batch.expires_at:
            # Items carry the batch's window as their TTL: the queued ones expire now (running
            # ones finish), and the batch ends expired with what it has.
            await self.service.queue.expire_overdue()
        if batch.status is BatchStatus.CANCELLING:
            await self._cancel_queued(batch)
        at_provider = (0, 0)
        if batch.provider_upstreams and batch.status is not BatchStatus.VALIDATING:
            at_provider = await self.providers.drive(batch, token)
        counts = await self.store.item_counts(batch.id)
        done = sum(counts.get(s.value, 0) for s in JobStatus if s.is_terminal)
        completed = counts.get(JobStatus.SUCCEEDED.value, 0)
        # What the providers count moves progress before their results are read; never back.
        shown = (
            max(completed, at_provider[0], batch.completed),
            max(done - completed, at_provider[1], batch.failed),
        )
        if shown != (batch.completed, batch.failed):
            await self._progress(batch, shown[0], shown[1], now)
        total = batch.total
        stale = now - batch.updated_at >= service.config.lease_seconds * 1000
        if batch.status is BatchStatus.CANCELLING and batch.lines_queued < total and stale:
            total = (
                batch.lines_queued
            )  # cancelled while its items were written, by a process gone since
        if done < total or batch.status is BatchStatus.VALIDATING:
            return
        if batch.status is BatchStatus.CANCELLING:
            ending, stamp = BatchStatus.CANCELLED, "cancelled_at"
        elif counts.get(JobStatus.EXPIRED.value, 0):
            ending, stamp = BatchStatus.EXPIRED, "expired_at"
        else:
            ending, stamp = BatchStatus.COMPLETED, "completed_at"
        if batch.status is not BatchStatus.FINALIZING:
            values = {"finalizing_at": now, "updated_at": now}
            batch = await self.store.transition(batch.id, BatchStatus.FINALIZING, values) or batch
        await self._finalize(batch, ending, {stamp: now})

    async def _progress(self, batch: BatchRecord, completed: int, failed: int, now: int) -> None:
        values: dict[str, Any] = {"completed": completed, "failed": failed, "updated_at": now}
        throttle = self.service.config.progress_seconds * 1000
        emit = batch.progress_at is None or now - batch.progress_at >= throttle
        if emit:
            values["progress_at"] = now
        updated = await self.store.update_batch(batch.id, values)
        if emit and updated is not None and completed + failed < updated.total:
            await self.service.queue.batch_progress(batch.id, batch_json(updated))

    async def _fail_unqueued(self, batch: BatchRecord, exc: Exception) -> None:
        """A batch whose items cannot all be written ends failed, once, rather than being
        retried for ever: the items written are cancelled, its error says why."""
        known = isinstance(exc, Unqueueable)
        log.error("batch %s cannot be queued, so it fails: %s", batch.id, exc, exc_info=not known)
        reason = str(exc) if known else "its requests could not be written (see the server log)"
        await self._cancel_queued(batch)
        error = {"code": "batch_not_queued", "message": f"the batch was not queued: {reason}",
                 "param": None, "line": None}  # fmt: skip
        await self.service.finish(
            batch.id, BatchStatus.FAILED, {"failed_at": self.clock.now_ms(), "errors": [error]}
        )

    async def _cancel_queued(self, batch: BatchRecord) -> None:
        while ids := await self.store.queued_item_ids(batch.id, 500):
            for job_id in ids:
                await self.service.queue.cancel(batch.tenant, job_id)

    async def _finalize(
        self, batch: BatchRecord, ending: BatchStatus, stamp: dict[str, Any]
    ) -> None:
        """Write the output and error files in input order, then end the batch."""
        output, errors, completed, failed = await self._write_results(batch)
        values = {
            **stamp,
            "output_file_id": output,
            "error_file_id": errors,
            "completed": completed,
            "failed": failed,
        }
        await self.service.finish(batch.id, ending, values)

    async def _write_results(self, batch: BatchRecord) -> tuple[str | None, str | None, int, int]:
        counts = {"out": 0, "err": 0}
        store = self.store

        async def lines(kind: str) -> AsyncIterator[bytes]:
            after = 0
            buffer = bytearray()
            while items := await store.items(batch.id, after, 500):
                for item in items:
                    line, ok = result_line(item)
                    if ok == (kind == "out"):
                        buffer += orjson.dumps(line) + b"\n"
                        counts[kind] += 1
                after = items[-1].batch_line or after
                if len(buffer) >= 256 * 1024:
                    yield bytes(buffer)
                    buffer.clear()
            if buffer:
                yield bytes(buffer)

        ids = {}
        now = self.clock.now_ms()
        for kind, name in (("out", "output"), ("err", "errors")):
            record = FileRecord(new_id("file"), batch.tenant, "batch_output",
                                f"{batch.id}_{name}.jsonl", 0, now)  # fmt: skip
            written = await store.write_file(record, lines(kind))
            if counts[kind]:
                ids[kind] = written.id
            else:
                await store.delete_file(batch.tenant, written.id)
        return ids.get("out"), ids.get("err"), counts["out"], counts["err"]

    async def _repair_terminal_events(self) -> None:
        """A batch that ended without its terminal event (a crash between the two writes)."""
        for batch in await self.store.ended_without_event():
            await self.service.queue.end_batch(
                batch.id, TERMINAL_EVENTS[batch.status], batch_json(batch)
            )
