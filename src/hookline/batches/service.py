"""The batch service, for the API: files, and batches checked line by line, written whole or not
at all, cancelled, finished."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import orjson

from hookline import jsonlimits
from hookline.batches.format import (
    ANCHOR_LEASE,
    ENDPOINTS,
    EXECUTIONS,
    PROVIDER_LEASE,
    BatchRequest,
    at_provider,
    batch_json,
    read_lines,
)
from hookline.clock import Clock
from hookline.config import BatchesConfig, Settings
from hookline.deliveries import DEFAULT_BATCH_EVENTS
from hookline.errors import InvalidRequest, NotFound, StoreError, TooLarge
from hookline.events import EventType
from hookline.ids import new_id
from hookline.jobs import Job, JobStatus, Lane, Operation
from hookline.queue import JobQueue
from hookline.store.base_batches import (
    Batches,
    BatchRecord,
    BatchStatus,
    FileRecord,
)

log = logging.getLogger("hookline.batches")
_MAX_ERRORS = 100
_ITEMS_PER_WRITE = 500
_WINDOW = re.compile(r"([1-9][0-9]{0,3})h")
# A line's limits are a request body's (hookline.jsonlimits), besides [jobs] max_body_bytes.
_MAX_METADATA = 16


class BatchService:
    """Files and batches, for the API (and the runner's item writing)."""

    def __init__(self, store: Batches, queue: JobQueue, settings: Settings, clock: Clock):
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

    def check(self, request: BatchRequest) -> None:
        """Refuse (:class:`InvalidRequest`) a request whose options are wrong, before any of its
        lines is read or stored."""
        if request.endpoint is not None and request.endpoint not in ENDPOINTS:
            raise InvalidRequest(
                f"endpoint must be one of {sorted(ENDPOINTS)} (got {request.endpoint!r})"
            )
        if _WINDOW.fullmatch(request.completion_window) is None:
            raise InvalidRequest("completion_window must be hours, like '24h'")
        if request.execution is not None and request.execution not in EXECUTIONS:
            raise InvalidRequest(f"execution must be one of {list(EXECUTIONS)}")
        metadata = request.metadata or {}
        if len(metadata) > _MAX_METADATA:
            raise InvalidRequest(f"metadata has at most {_MAX_METADATA} keys (got {len(metadata)})")
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise InvalidRequest("metadata must be a JSON object of strings")
            if len(key) > 64 or len(value) > 512:
                raise InvalidRequest("metadata keys are at most 64 characters and values 512")
            if "\x00" in key or "\x00" in value:
                raise InvalidRequest("metadata must not contain NUL characters")

    async def submit(
        self, tenant: str, request: BatchRequest, filename: str, chunks: AsyncIterator[bytes]
    ) -> BatchRecord:
        """Store the lines as the batch's input file (``request.input_file_id`` is not used) and
        create the batch from it. A batch refused, or failing on the way, leaves nothing behind,
        its file included."""
        self.check(request)
        record = await self.upload(tenant, filename, "batch", chunks)
        try:
            return await self.create(tenant, dataclasses.replace(request, input_file_id=record.id))
        except BaseException:
            await _undo(f"file {record.id}", self.store.delete_file(tenant, record.id))
            raise

    async def create(self, tenant: str, request: BatchRequest) -> BatchRecord:
        """Check every line, then create the batch and queue its items: all of it, or (on any
        error) none of it. With bad lines, the batch is created failed, its errors naming the
        lines, and nothing runs. The input file, uploaded before, is left as it is. A tenant
        whose token budget is spent gets :class:`~hookline.errors.LimitReached`."""
        await self.queue.check_budget(tenant)
        source = await self.file(tenant, request.input_file_id)
        self.check(request)
        endpoint, total, errors, upstreams = await self._check(source.id, request.endpoint)
        provider = [] if errors else self._provider_upstreams(request, endpoint, upstreams)
        window = _WINDOW.fullmatch(request.completion_window)
        assert window is not None
        now = self.clock.now_ms()
        batch_id = new_id("batch")
        item_events = sorted(
            e for e in (request.webhook or {}).get("events") or () if e.startswith("job.")
        )
        row: dict[str, Any] = {
            "id": batch_id, "tenant": tenant,
            "status": (BatchStatus.FAILED if errors else BatchStatus.VALIDATING).value,
            "endpoint": endpoint or request.endpoint or "/v1/chat/completions",
            "input_file_id": source.id, "output_file_id": None, "error_file_id": None,
            "completion_window": request.completion_window, "metadata": request.metadata,
            "errors": errors or None, "item_events": item_events, "total": total,
            "completed": 0, "failed": 0, "lines_queued": 0, "created_at": now, "updated_at": now,
            "expires_at": now + int(window.group(1)) * 3_600_000, "in_progress_at": None,
            "finalizing_at": None, "completed_at": None, "failed_at": now if errors else None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None, "progress_at": None,
            "lease_token": None, "lease_expires_at": None,
            "provider_upstreams": provider or None,
        }  # fmt: skip
        await self.store.insert_batch(row, self._anchor(tenant, batch_id, now, request.webhook))
        if errors:
            # Failed from its first write. Should its event not follow, the runner writes it.
            batch = BatchRecord.from_row(row)
            with contextlib.suppress(StoreError):
                await self.queue.end_batch(batch_id, EventType.BATCH_FAILED, batch_json(batch))
            return batch
        try:
            return await self.queue_items(batch_id)
        except BaseException:
            # Its items are written several transactions apart (one would hold the database for
            # as long as 50,000 rows take): taking back what was written makes it one.
            await _undo(f"batch {batch_id}", self.store.delete_batch(batch_id))
            raise

    def _provider_upstreams(
        self, request: BatchRequest, endpoint: str | None, upstreams: set[str]
    ) -> list[str]:
        """The upstreams whose items run as provider batches (docs/async-upstreams.md):
        with ``execution`` auto those with ``batch_api``, with provider_batch every one (each
        must have a batch API), with single none."""
        execution = request.execution or "auto"
        if execution == "single":
            return []
        configs = {u.name: u for u in self.settings.upstreams}
        chosen = []
        for name in sorted(upstreams):
            config = configs.get(name)
            if config is None:
                continue
            asked = config.batch_api or execution == "provider_batch"
            fits = config.runs_batches and len(name) <= 58
            if config.type == "anthropic" and endpoint not in (None, "/v1/chat/completions"):
                fits = False
            if asked and fits:
                chosen.append(name)
            elif execution == "provider_batch":
                raise InvalidRequest(
                    f"execution 'provider_batch': upstream {name!r} (type {config.type}) has no "
                    f"batch API for {endpoint or 'this endpoint'}"
                )
        return chosen

    def _anchor(self, tenant: str, batch_id: str, now: int, webhook: dict[str, Any] | None) -> Job:
        if webhook is not None:
            # The batch's own deliveries: its URL for the batch.* events asked for, and the
            # data sinks it named (every item's events and the batch's go there).
            sinks = webhook.get("sinks") or []
            if webhook.get("url"):
                batch_events = [e for e in webhook.get("events") or () if not e.startswith("job.")]
                events = batch_events or list(DEFAULT_BATCH_EVENTS)
                webhook = {"url": webhook["url"], "events": events}
            else:
                webhook = {}
            if sinks:
                webhook["sinks"] = sinks
            webhook = webhook or None
        # Written running, leased to no worker (ANCHOR_LEASE), so that it is never claimed.
        return Job.new(
            id=batch_id, tenant=tenant, operation=Operation.BATCH, now=now, max_attempts=1,
            webhook=webhook, status=JobStatus.RUNNING, attempts=1, started_at=now,
            lease_token=ANCHOR_LEASE, event_seq=0,
        )  # fmt: skip

    async def _check(
        self, file_id: str, endpoint: str | None
    ) -> tuple[str | None, int, list[dict[str, Any]], set[str]]:
        """(the endpoint, the number of lines, the errors, the upstreams its lines go to) of an
        input file, read once."""
        errors: list[dict[str, Any]] = []
        upstreams: set[str] = set()
        seen: set[bytes] = set()
        total = 0
        max_line = self.settings.jobs.max_body_bytes

        def error(line: int, code: str, message: str, param: str | None = None) -> None:
            if len(errors) < _MAX_ERRORS:
                errors.append({"code": code, "message": message, "param": param, "line": line})

        async for number, raw in read_lines(self.store.read_file(file_id), max_line):
            total = number
            if total > self.config.max_lines:
                raise InvalidRequest(
                    f"the input has more than {self.config.max_lines} lines, the limit"
                )
            if raw is None:
                error(
                    number,
                    "line_too_large",
                    f"line {number} is longer than {max_line} bytes, the limit of a request",
                )
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                code = "nesting_too_deep" if "depth limit" in str(exc) else "invalid_json"
                error(number, code, f"line {number} is not valid JSON: {exc}")
                continue
            unfit = jsonlimits.unfit(raw, line)
            if unfit is not None:
                error(number, unfit[0], f"line {number}: {unfit[1]}")
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
            model = body.get("model") if isinstance(body, dict) else None
            if not isinstance(model, str) or not 0 < len(model) <= 256:
                error(
                    number,
                    "invalid_body",
                    f"line {number}: body must be an object with a model (1 to 256 characters)",
                    "body",
                )
                continue
            try:
                operation = (
                    isinstance(url, str) and ENDPOINTS.get(url)
                ) or Operation.CHAT_COMPLETIONS
                upstreams.add(self.queue.router.choose(model, operation.value).name)
            except InvalidRequest:
                error(
                    number,
                    "model_not_found",
                    f"line {number}: no upstream serves model {model!r}",
                    "body.model",
                )
        if total == 0:
            error(0, "empty_file", "the input file has no lines")
        return endpoint, total, errors, upstreams

    async def queue_items(self, batch_id: str) -> BatchRecord:
        """Write the batch's items as queued jobs, from the line after ``lines_queued`` (a
        restart continues where the last write stopped), then mark it in progress. Raises
        :class:`Unqueueable` when its input no longer allows that (the file was deleted, or a
        model is no longer served)."""
        batch = await self.store.get_batch(batch_id)
        anchor = await self.queue.store.get_job(batch_id)
        if batch is None or anchor is None:
            raise Unqueueable(f"batch {batch_id} is not in the database")
        url = (anchor.webhook or {}).get("url")
        webhook = {"url": url, "events": batch.item_events} if url and batch.item_events else None
        if sinks := (anchor.webhook or {}).get("sinks"):
            webhook = {**(webhook or {}), "sinks": sinks}
        items: list[Job] = []
        last = 0
        lines = read_lines(
            self.store.read_file(batch.input_file_id), self.settings.jobs.max_body_bytes
        )
        async for number, raw in lines:
            last = number
            if number <= batch.lines_queued:
                continue
            items.append(self._item(batch, number, raw, webhook))
            if len(items) == _ITEMS_PER_WRITE:
                await self._write_items(batch_id, items)
                items = []
        if last != batch.total:
            raise Unqueueable(f"its input file {batch.input_file_id} is gone")
        if items:
            await self._write_items(batch_id, items)
        now = self.clock.now_ms()
        values = {"in_progress_at": now, "updated_at": now}
        updated = await self.store.transition(batch_id, BatchStatus.IN_PROGRESS, values)
        return updated or await self._get(batch_id)  # cancelled meanwhile

    def _item(
        self, batch: BatchRecord, number: int, raw: bytes | None, webhook: dict[str, Any] | None
    ) -> Job:
        """Line ``number`` as a queued job. Its webhook: the batch's URL, for the ``job.*``
        events the batch's filter asked for (none unless asked)."""
        try:
            line = orjson.loads(raw or b"")
            body = {k: v for k, v in line["body"].items() if k not in ("stream", "stream_options")}
            model = body.pop("model")
            upstream = self.queue.router.choose(model, ENDPOINTS[batch.endpoint].value).name
        except (orjson.JSONDecodeError, InvalidRequest, LookupError, TypeError) as exc:
            raise Unqueueable(f"line {number}: {exc}") from exc
        now = self.clock.now_ms()
        if upstream in (batch.provider_upstreams or ()):
            # Run in the upstream's provider batch: written running (hookline.batches.provider).
            upstream = at_provider(upstream)
            more: dict[str, Any] = {"status": JobStatus.RUNNING, "attempts": 1, "started_at": now,
                                    "lease_token": PROVIDER_LEASE, "event_seq": 2}  # fmt: skip
        else:
            more = {}
        return Job.new(
            id=f"job_{batch.id.removeprefix('batch_')}_{number:06d}", tenant=batch.tenant,
            operation=ENDPOINTS[batch.endpoint], now=now,
            max_attempts=self.settings.jobs.max_attempts, model=model, upstream=upstream,
            input=body, priority=self.config.item_priority, expires_at=batch.expires_at,
            webhook=webhook, batch_id=batch.id, batch_line=number, custom_id=line["custom_id"],
            lane=Lane.BATCH, **more,
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
        if batch.status.is_terminal or batch.status is BatchStatus.CANCELLING:
            return batch
        now = self.clock.now_ms()
        values = {"cancelling_at": now, "updated_at": now}
        updated = await self.store.transition(batch_id, BatchStatus.CANCELLING, values)
        self.queue.notifier.publish(BATCHES_CHANGED)
        return updated or await self.get(tenant, batch_id)

    async def finish(
        self, batch_id: str, status: BatchStatus, values: dict[str, Any]
    ) -> BatchRecord:
        """End a batch: its row, then its terminal event (the anchor's transition, which happens
        once). A crash between the two is repaired by the runner (see BatchRunner). A batch
        that has ended already is left as it is."""
        now = self.clock.now_ms()
        batch = await self.store.transition(batch_id, status, {"updated_at": now, **values})
        if batch is None:
            return await self._get(batch_id)
        await self.queue.end_batch(batch_id, TERMINAL_EVENTS[status], batch_json(batch))
        return batch


BATCHES_CHANGED = "batches.changed"  # a batch was cancelled: wakes the runner
TERMINAL_EVENTS = {
    BatchStatus.COMPLETED: EventType.BATCH_COMPLETED,
    BatchStatus.FAILED: EventType.BATCH_FAILED,
    BatchStatus.CANCELLED: EventType.BATCH_CANCELLED,
    BatchStatus.EXPIRED: EventType.BATCH_EXPIRED,
}


class Unqueueable(InvalidRequest):
    """A batch's items cannot be written: its input no longer allows it."""


async def _undo(what: str, cleanup: Awaitable[Any]) -> None:
    """Take back what a failed request wrote, before its error goes on: an error here is
    logged, never raised over the first one."""
    try:
        await cleanup
    except Exception as exc:
        log.warning("could not remove %s after a failed batch request: %s", what, exc)
