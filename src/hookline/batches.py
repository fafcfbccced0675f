"""Batches: thousands of requests in one call, in OpenAI's Batch format, run as jobs.

A batch is an input file of JSONL lines ``{custom_id, method, url, body}``. Creating it checks
every line first (JSON, a unique ``custom_id``, a supported ``url`` matching the batch's endpoint,
a model some upstream serves): one bad line fails the whole batch with errors naming the lines,
and nothing runs. Then each line becomes a job (an *item*: ``jobs.batch_id``, ``batch_line``,
``custom_id``), queued below interactive work (``[batches] item_priority``) so a big batch never
starves interactive callers, under the same upstream limits.

A batch's events (``batch.progress``, then one of ``batch.completed``, ``batch.failed``,
``batch.cancelled``, ``batch.expired``) are in the event log under the batch's id, carried by an
*anchor* row in ``jobs`` (operation ``batch``, lease ``batch``, no upstream: never claimed, hidden
from the job API). So the tenant stream, SSE and webhooks serve batches exactly as they serve jobs.

:class:`BatchRunner` (in every worker process) leases the active batches, one runner each: it
counts their items, records throttled progress, cancels the queued items of a cancelled or expired
batch, and once every item has ended writes the output and error files (in input order, streamed)
and the terminal event. All of it is derived from the rows, so a restart anywhere continues.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson

from hookline.clock import Clock
from hookline.config import BatchesConfig, Settings
from hookline.errors import InvalidRequest, NotFound, StoreError, TooLarge
from hookline.events import EventType
from hookline.ids import new_id
from hookline.jobs import Job, JobStatus, Operation
from hookline.queue import JobQueue
from hookline.store.batch_sql import BatchRecord, BatchStore, FileRecord
from hookline.webhooks import DEFAULT_BATCH_EVENTS

log = logging.getLogger("hookline.batches")

ENDPOINTS = {
    "/v1/chat/completions": Operation.CHAT_COMPLETIONS,
    "/v1/completions": Operation.COMPLETIONS,
    "/v1/embeddings": Operation.EMBEDDINGS,
}
ANCHOR_LEASE = "batch"
ACTIVE = ("validating", "in_progress", "cancelling", "finalizing")
TERMINAL = ("completed", "failed", "expired", "cancelled")
_MAX_ERRORS = 100
_ITEMS_PER_WRITE = 500
_WINDOW = re.compile(r"^([1-9][0-9]{0,3})h$")


def file_json(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at // 1000,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
    }


def batch_json(batch: BatchRecord) -> dict[str, Any]:
    """The batch as OpenAI's API shows it (times in epoch seconds)."""

    def seconds(ms: int | None) -> int | None:
        return None if ms is None else ms // 1000

    errors = {"object": "list", "data": batch.errors} if batch.errors else None
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": seconds(batch.created_at),
        "in_progress_at": seconds(batch.in_progress_at),
        "expires_at": seconds(batch.expires_at),
        "finalizing_at": seconds(batch.finalizing_at),
        "completed_at": seconds(batch.completed_at),
        "failed_at": seconds(batch.failed_at),
        "expired_at": seconds(batch.expired_at),
        "cancelling_at": seconds(batch.cancelling_at),
        "cancelled_at": seconds(batch.cancelled_at),
        "request_counts": {
            "total": batch.total,
            "completed": batch.completed,
            "failed": batch.failed,
        },
        "metadata": batch.metadata or {},
    }


@dataclasses.dataclass(frozen=True)
class BatchRequest:
    input_file_id: str
    endpoint: str | None
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
    webhook: dict[str, Any] | None = None  # {"url", "events"}


class BatchService:
    """Files and batches, for the API (and the runner's item writing)."""

    def __init__(self, store: BatchStore, queue: JobQueue, settings: Settings, clock: Clock):
        self.store = store
        self.queue = queue
        self.settings = settings
        self.clock = clock

    @property
    def config(self) -> BatchesConfig:
        return self.settings.batches

    # --- files

    async def upload(
        self, tenant: str, filename: str, purpose: str, chunks: AsyncIterator[bytes]
    ) -> FileRecord:
        if purpose not in ("batch", "batch_output"):
            raise InvalidRequest(f"purpose must be 'batch' (got {purpose!r})")
        record = FileRecord(new_id("file"), tenant, purpose, filename[:512] or "upload.jsonl",
                            0, self.clock.now_ms())  # fmt: skip
        stored = await self.store.create_file(record, chunks, self.config.max_bytes)
        if stored is None:
            raise TooLarge(f"the file is larger than the limit of {self.config.max_bytes} bytes")
        return stored

    async def file(self, tenant: str, file_id: str) -> FileRecord:
        record = await self.store.get_file(tenant, file_id)
        if record is None:
            raise NotFound(f"no file {file_id!r}")
        return record

    # --- batches

    async def create(self, tenant: str, request: BatchRequest) -> BatchRecord:
        """Check every line, then (all good) create the batch and queue its items; with bad
        lines, the batch is created failed, its errors naming the lines."""
        source = await self.file(tenant, request.input_file_id)
        if request.endpoint is not None and request.endpoint not in ENDPOINTS:
            raise InvalidRequest(
                f"endpoint must be one of {sorted(ENDPOINTS)} (got {request.endpoint!r})"
            )
        window = _WINDOW.match(request.completion_window)
        if window is None:
            raise InvalidRequest("completion_window must be hours, like '24h'")
        endpoint, total, errors = await self._check(source.id, request.endpoint)
        now = self.clock.now_ms()
        batch_id = new_id("batch")
        item_events = sorted(
            e for e in (request.webhook or {}).get("events") or () if e.startswith("job.")
        )
        row: dict[str, Any] = {
            "id": batch_id, "tenant": tenant, "status": "validating",
            "endpoint": endpoint or request.endpoint or "/v1/chat/completions",
            "input_file_id": source.id, "output_file_id": None, "error_file_id": None,
            "completion_window": request.completion_window, "metadata": request.metadata,
            "errors": errors or None, "item_events": item_events, "total": total,
            "completed": 0, "failed": 0, "lines_queued": 0, "created_at": now, "updated_at": now,
            "expires_at": now + int(window.group(1)) * 3_600_000, "in_progress_at": None,
            "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
            "cancelling_at": None, "cancelled_at": None, "progress_at": None,
            "lease_token": None, "lease_expires_at": None,
        }  # fmt: skip
        await self.store.insert_batch(row, self._anchor(tenant, batch_id, now, request.webhook))
        if errors:
            return await self.finish(batch_id, "failed", {"failed_at": now})
        return await self.queue_items(batch_id)

    def _anchor(self, tenant: str, batch_id: str, now: int, webhook: dict[str, Any] | None) -> Job:
        if webhook is not None:
            batch_events = [e for e in webhook.get("events") or () if not e.startswith("job.")]
            webhook = {"url": webhook["url"], "events": batch_events or list(DEFAULT_BATCH_EVENTS)}
        return Job(
            id=batch_id, tenant=tenant, status=JobStatus.RUNNING, operation=Operation.BATCH,
            model="", upstream="", input={}, output=None, error=None, metadata={}, priority=0,
            attempts=1, max_attempts=1, idempotency_key=None, request_hash=None,
            created_at=now, updated_at=now, started_at=now, finished_at=None, expires_at=None,
            run_after=now, lease_token=ANCHOR_LEASE, lease_expires_at=None, event_seq=0,
            webhook=webhook,
        )  # fmt: skip

    async def _check(
        self, file_id: str, endpoint: str | None
    ) -> tuple[str | None, int, list[dict[str, Any]]]:
        """(the endpoint, the number of lines, the errors) of an input file, read once."""
        errors: list[dict[str, Any]] = []
        seen: set[bytes] = set()
        total = 0

        def error(line: int, code: str, message: str, param: str | None = None) -> None:
            if len(errors) < _MAX_ERRORS:
                errors.append({"code": code, "message": message, "param": param, "line": line})

        async for number, raw in _lines(self.store.read_file(file_id)):
            total = number
            if total > self.config.max_lines:
                raise InvalidRequest(
                    f"the input has more than {self.config.max_lines} lines, the limit"
                )
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                error(number, "invalid_json", f"line {number} is not valid JSON: {exc}")
                continue
            if not isinstance(line, dict):
                error(number, "invalid_request", f"line {number} must be a JSON object")
                continue
            custom_id = line.get("custom_id")
            if not isinstance(custom_id, str) or not 0 < len(custom_id) <= 512:
                error(
                    number,
                    "missing_custom_id",
                    f"line {number}: custom_id must be a non-empty string",
                    "custom_id",
                )
            else:
                digest = hashlib.blake2b(custom_id.encode(), digest_size=12).digest()
                if digest in seen:
                    error(
                        number,
                        "duplicate_custom_id",
                        f"line {number}: custom_id {custom_id!r} is used by an earlier line",
                        "custom_id",
                    )
                seen.add(digest)
            if line.get("method", "POST") != "POST":
                error(number, "invalid_method", f"line {number}: method must be POST", "method")
            url = line.get("url")
            if url not in ENDPOINTS:
                error(
                    number,
                    "invalid_url",
                    f"line {number}: url must be one of {sorted(ENDPOINTS)}",
                    "url",
                )
            elif endpoint is None:
                endpoint = url
            elif url != endpoint:
                error(
                    number,
                    "mismatched_url",
                    f"line {number}: url {url!r} is not the batch's endpoint {endpoint!r}",
                    "url",
                )
            body = line.get("body")
            if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                error(
                    number,
                    "invalid_body",
                    f"line {number}: body must be an object with a model",
                    "body",
                )
                continue
            try:
                self.settings.upstream_for(body["model"])
            except InvalidRequest:
                error(
                    number,
                    "model_not_found",
                    f"line {number}: no upstream serves model {body['model']!r}",
                    "body.model",
                )
        if total == 0:
            error(0, "empty_file", "the input file has no lines")
        return endpoint, total, errors

    async def queue_items(self, batch_id: str) -> BatchRecord:
        """Write the batch's items as queued jobs, from the line after ``lines_queued`` (a
        restart continues where the last write stopped), then mark it in progress."""
        batch = await self.store.get_batch(batch_id)
        anchor = await self.queue.store.get_job(batch_id)
        assert batch is not None and anchor is not None
        url = (anchor.webhook or {}).get("url")
        webhook = {"url": url, "events": batch.item_events} if url and batch.item_events else None
        items: list[Job] = []
        async for number, raw in _lines(self.store.read_file(batch.input_file_id)):
            if number <= batch.lines_queued:
                continue
            items.append(self._item(batch, number, orjson.loads(raw), webhook))
            if len(items) == _ITEMS_PER_WRITE:
                await self._write_items(batch_id, items)
                items = []
        if items:
            await self._write_items(batch_id, items)
        now = self.clock.now_ms()
        values = {"status": "in_progress", "in_progress_at": now, "updated_at": now}
        updated = await self.store.update_batch(batch_id, values, statuses=("validating",))
        return updated or await self._get(batch_id)

    def _item(
        self, batch: BatchRecord, number: int, line: dict[str, Any], webhook: dict[str, Any] | None
    ) -> Job:
        """Line ``number`` as a queued job. Its webhook: the batch's URL, for the ``job.*``
        events the batch's filter asked for (none unless asked)."""
        body = {k: v for k, v in line["body"].items() if k not in ("stream", "stream_options")}
        model = body.pop("model")
        now = self.clock.now_ms()
        return Job(
            id=f"job_{batch.id.removeprefix('batch_')}_{number:06d}", tenant=batch.tenant,
            status=JobStatus.QUEUED, operation=ENDPOINTS[batch.endpoint], model=model,
            upstream=self.settings.upstream_for(model).name, input=body, output=None,
            error=None, metadata={}, priority=self.config.item_priority, attempts=0,
            max_attempts=self.settings.jobs.max_attempts, idempotency_key=None,
            request_hash=None, created_at=now, updated_at=now, started_at=None,
            finished_at=None, expires_at=batch.expires_at, run_after=now, lease_token=None,
            lease_expires_at=None, event_seq=1, webhook=webhook, batch_id=batch.id,
            batch_line=number, custom_id=line["custom_id"],
        )  # fmt: skip

    async def _write_items(self, batch_id: str, items: list[Job]) -> None:
        await self.queue.add_items(items)
        last = items[-1].batch_line or 0
        now = self.clock.now_ms()
        await self.store.update_batch(batch_id, {"lines_queued": last, "updated_at": now})

    async def get(self, tenant: str, batch_id: str) -> BatchRecord:
        batch = await self.store.get_batch(batch_id, tenant)
        if batch is None:
            raise NotFound(f"no batch {batch_id!r}")
        return batch

    async def _get(self, batch_id: str) -> BatchRecord:
        batch = await self.store.get_batch(batch_id)
        if batch is None:
            raise NotFound(f"no batch {batch_id!r}")
        return batch

    async def cancel(self, tenant: str, batch_id: str) -> BatchRecord:
        """Stop a batch: its queued items are cancelled, running ones finish, finished ones are
        kept; the runner then writes the results and the batch ends ``cancelled``."""
        batch = await self.get(tenant, batch_id)
        if batch.status in TERMINAL or batch.status == "cancelling":
            return batch
        now = self.clock.now_ms()
        values = {"status": "cancelling", "cancelling_at": now, "updated_at": now}
        updated = await self.store.update_batch(
            batch_id, values, statuses=("validating", "in_progress")
        )
        self.queue.notifier.publish(BATCHES_CHANGED)
        return updated or await self.get(tenant, batch_id)

    async def finish(self, batch_id: str, status: str, values: dict[str, Any]) -> BatchRecord:
        """End a batch: its row, then its terminal event (the anchor's transition, which happens
        once). A crash between the two is repaired by the runner (see BatchRunner)."""
        now = self.clock.now_ms()
        batch = await self.store.update_batch(
            batch_id, {"status": status, "updated_at": now, **values}
        )
        assert batch is not None
        await self.queue.end_batch(batch_id, _TERMINAL_EVENTS[status], batch_json(batch))
        return batch


BATCHES_CHANGED = "batches.changed"  # a batch was cancelled: wakes the runner
_TERMINAL_EVENTS = {
    "completed": EventType.BATCH_COMPLETED,
    "failed": EventType.BATCH_FAILED,
    "cancelled": EventType.BATCH_CANCELLED,
    "expired": EventType.BATCH_EXPIRED,
}


async def _lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    """(line number, line) of a JSONL stream, blank lines skipped but counted."""
    buffer = b""
    number = 0
    async for chunk in chunks:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            number += 1
            if raw.strip():
                yield number, raw
    if buffer.strip():
        yield number + 1, buffer


class BatchRunner:
    """Drives the active batches (one runner per batch at a time, by lease)."""

    def __init__(self, service: BatchService) -> None:
        self.service = service
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
        if await self.store.any_in(ACTIVE):  # most of the time there is none: no write then
            now = self.clock.now_ms()
            lease = now + int(self.service.config.lease_seconds * 1000)
            for batch in await self.store.claim_batches(ACTIVE, now, token, lease):
                await self._drive(batch)
        await self._repair_terminal_events()

    async def _drive(self, batch: BatchRecord) -> None:
        service = self.service
        now = self.clock.now_ms()
        if batch.status == "validating":
            if now - batch.updated_at < service.config.lease_seconds * 1000:
                return  # its API request is still writing the items
            batch = await service.queue_items(batch.id)
        if batch.status == "in_progress" and now >= batch.expires_at:
            # Items carry the batch's window as their TTL: the queued ones expire now (running
            # ones finish), and the batch ends expired with what it has.
            await self.service.queue.expire_overdue()
        if batch.status == "cancelling":
            await self._cancel_queued(batch)
        counts = await self.store.item_counts(batch.id)
        done = sum(counts.get(s.value, 0) for s in JobStatus if s.is_terminal)
        completed = counts.get(JobStatus.SUCCEEDED.value, 0)
        if (completed, done - completed) != (batch.completed, batch.failed):
            await self._progress(batch, completed, done - completed, now)
        total = batch.total
        stale = now - batch.updated_at >= service.config.lease_seconds * 1000
        if batch.status == "cancelling" and batch.lines_queued < total and stale:
            total = (
                batch.lines_queued
            )  # cancelled while its items were written, by a process gone since
        if done < total or batch.status == "validating":
            return
        if batch.status == "cancelling":
            ending, stamp = "cancelled", "cancelled_at"
        elif counts.get(JobStatus.EXPIRED.value, 0):
            ending, stamp = "expired", "expired_at"
        else:
            ending, stamp = "completed", "completed_at"
        if batch.status != "finalizing":
            values = {"status": "finalizing", "finalizing_at": now, "updated_at": now}
            batch = await self.store.update_batch(batch.id, values) or batch
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

    async def _cancel_queued(self, batch: BatchRecord) -> None:
        while ids := await self.store.queued_item_ids(batch.id, 500):
            for job_id in ids:
                await self.service.queue.cancel(batch.tenant, job_id)

    async def _finalize(self, batch: BatchRecord, ending: str, stamp: dict[str, Any]) -> None:
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
                batch.id, _TERMINAL_EVENTS[batch.status], batch_json(batch)
            )


def result_line(item: Job) -> tuple[dict[str, Any], bool]:
    """An item's line in OpenAI's output format, and whether it belongs in the output file (else
    the error file)."""
    base = {"id": f"batch_req_{item.id.removeprefix('job_')}", "custom_id": item.custom_id}
    if item.status is JobStatus.SUCCEEDED:
        response = {"status_code": 200, "request_id": item.id, "body": item.output}
        return {**base, "response": response, "error": None}, True
    if item.status is JobStatus.FAILED:
        error = item.error or {}
        status = int(error.get("upstream_status") or 500)
        body = error.get("upstream_body") or {
            "error": {"message": error.get("message"), "type": error.get("type"), "code": None}
        }
        response = {"status_code": status, "request_id": item.id, "body": body}
        return {**base, "response": response, "error": None}, False
    code, message = {
        JobStatus.CANCELLED: ("batch_cancelled", "the batch was cancelled before this request ran"),
        JobStatus.EXPIRED: (
            "batch_expired",
            "this request could not run within the completion window",
        ),
    }.get(item.status, ("batch_expired", "this request could not run within the completion window"))
    return {**base, "response": None, "error": {"code": code, "message": message}}, False


__all__ = ["BatchRequest", "BatchRunner", "BatchService", "batch_json", "file_json"]
