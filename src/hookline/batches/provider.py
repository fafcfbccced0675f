"""Provider batches: a hookline batch's items run by an upstream's own batch API (OpenAI's Batch
API, Anthropic's Message Batches) instead of one call each, with the callbacks that API lacks.

The items are written running under :data:`~hookline.batches.format.PROVIDER_LEASE` (their
``upstream`` is ``<name>#batch``: they hold none of the upstream's slots). The batch runner,
which leases each batch to one process, calls :meth:`ProviderBatches.drive` on every pass. Each
part (up to ``batch_max_requests`` items and ``batch_max_bytes`` of requests of one upstream) is
a row of ``provider_batches`` that moves:

- ``pending`` → ``creating``: written *before* the provider is asked, so that a process taking
  over after a crash looks the batch up at the provider (by its metadata) before creating it
  again: a batch is submitted once;
- ``creating`` → ``submitted``: the provider's file and batch ids, in the write that records the
  creation;
- ``submitted``: looked at when due (the first wait ``batch_poll_seconds``, doubling up to
  ``batch_poll_max_seconds``, never sooner than the provider's ``retry-after`` or
  ``openai-poll-after-ms``) or at once when an inbound webhook says it changed; its
  ``request_counts`` feed ``batch.progress``;
- ``fetching``: ended at the provider: its results are read a line at a time and each item ends
  (``job.succeeded`` / ``job.failed`` …, per-item webhooks and sinks) in transactions of 500,
  each item only while still held, so results read again after a crash are not delivered twice;
  items without a result end as the provider batch did (expired, cancelled, failed);
- ``done``.

A cancelled batch cancels its provider batches; a batch past its window has them cancelled and
its unfinished items expire. The runner then writes the result files and the terminal event as
for any batch.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from hookline.batches.format import ENDPOINTS, PROVIDER_LEASE, at_provider
from hookline.batches.service import BatchService
from hookline.errors import StoreError
from hookline.jobs import Job, JobStatus
from hookline.queue import ItemResult, UpstreamFailure
from hookline.store.base_batches import BatchRecord, BatchStatus, PartState, ProviderPart
from hookline.upstreams.base import UpstreamError
from hookline.upstreams.provider_batches import ProviderBatchAPI, ProviderResult, ProviderState

log = logging.getLogger("hookline.batches")
_PAGE = 500  # items read, and results settled, per transaction
_ALL_LINES = 2**31 - 1  # past every line (an INTEGER)


class LeaseLost(StoreError):
    """Another runner took the batch over: this one stops driving it."""


class ProviderBatches:
    """Drives the provider batches of the hookline batches that have some."""

    def __init__(self, service: BatchService, clients: Mapping[str, ProviderBatchAPI]) -> None:
        self.service = service
        self.store = service.store
        self.queue = service.queue
        self.clock = service.clock
        self.clients = dict(clients)
        self.configs = {u.name: u for u in service.settings.upstreams}

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()

    async def drive(self, batch: BatchRecord, token: str) -> tuple[int, int]:
        """One pass over the batch's provider batches; (completed, failed) as the providers
        count them."""
        parts = await self.store.parts(batch.id)
        if not parts:
            parts = await self._plan(batch)
        for part in parts:
            if part.state is PartState.DONE:
                continue
            try:
                await self._step(batch, part, token)
            except UpstreamError as exc:
                await self._trouble(batch, part, exc)
        parts = await self.store.parts(batch.id)
        return sum(p.completed for p in parts), sum(p.failed for p in parts)

    # --- planning

    async def _plan(self, batch: BatchRecord) -> list[ProviderPart]:
        """Cut the batch's provider items into parts within each upstream's limits."""
        rows: list[dict[str, Any]] = []
        now = self.clock.now_ms()
        for name in batch.provider_upstreams or ():
            client, config = self.clients.get(name), self.configs.get(name)
            if client is None or config is None:
                await self._fail_all(batch, at_provider(name), f"no upstream {name!r} here")
                continue
            current: dict[str, Any] | None = None
            size = 0
            async for item, line in self._requests(batch, name, 0, _ALL_LINES):
                if line is None:
                    continue
                full = current is not None and (
                    current["requests"] >= config.batch_max_requests
                    or size + len(line) + 1 > config.batch_max_bytes
                )
                if current is None or full:
                    part = len(rows)
                    current = {
                        "id": f"{batch.id}.{part}", "batch_id": batch.id, "part": part,
                        "upstream": name, "first_line": item.batch_line, "requests": 0,
                        "state": PartState.PENDING.value, "provider_status": None,
                        "provider_batch_id": None, "provider_file_id": None,
                        "output_file_id": None, "error_file_id": None, "results_url": None,
                        "completed": 0, "failed": 0, "errors": None, "stop": None,
                        "stop_sent": False, "creating_at": None, "next_poll_at": now,
                        "poll_ms": int(config.batch_poll_seconds * 1000), "polls": 0,
                        "created_at": now, "updated_at": now,
                    }  # fmt: skip
                    rows.append(current)
                    size = 0
                current["requests"] += 1
                current["last_line"] = item.batch_line
                size += len(line) + 1
        await self.store.insert_parts(rows)
        return await self.store.parts(batch.id)

    async def _requests(
        self, batch: BatchRecord, name: str, after: int, last: int
    ) -> AsyncIterator[tuple[Job, bytes | None]]:
        """The part's items still at the provider, each with its request line (None for one
        the provider cannot take: that item fails here and now)."""
        client = self.clients[name]
        operation = ENDPOINTS[batch.endpoint]
        router = self.queue.router
        while items := await self.store.part_items(batch.id, at_provider(name), after, last, _PAGE):
            refused: list[ItemResult] = []
            for item in items:
                if item.status is not JobStatus.RUNNING or item.lease_token != PROVIDER_LEASE:
                    continue
                body = {**item.input, "model": router.model_for(item.model, name)}
                try:
                    line: bytes | None = client.line(item.id, operation, body)
                except UpstreamError as exc:
                    failure = UpstreamFailure(exc.type, exc.message, exc.status, body=exc.body)
                    refused.append(ItemResult(item.id, "failed", failure=failure))
                    line = None
                yield item, line
            if refused:
                await self.queue.settle_items(refused, PROVIDER_LEASE)
            after = items[-1].batch_line or after

    # --- one part

    async def _step(self, batch: BatchRecord, part: ProviderPart, token: str) -> None:
        now = self.clock.now_ms()
        client = self.clients[part.upstream]
        if part.stop is None:
            stop = None
            if batch.status is BatchStatus.CANCELLING:
                stop = "cancelled"
            elif now >= batch.expires_at:
                stop = "expired"
            if stop is not None:
                part = await self._update(part, {"stop": stop, "next_poll_at": now})
        if part.state in (PartState.PENDING, PartState.CREATING):
            if part.next_poll_at > now:
                return
            found = None
            if part.state is PartState.CREATING:  # tried before: did it reach the provider?
                assert part.creating_at is not None
                taken = await self.store.provider_batch_ids(part.upstream)
                found = await client.find(_metadata(part), part.creating_at, part.requests, taken)
                if found is not None:
                    log.info("batch %s part %d: found %s at the provider", batch.id, part.part,
                             found.id)  # fmt: skip
            if found is None and part.stop is not None:
                await self._close(batch, part, None)
                return
            if found is None:
                part = await self._update(part, {"state": PartState.CREATING.value,
                                                 "creating_at": now})  # fmt: skip
                requests = (line async for _, line in
                            self._requests(batch, part.upstream, part.first_line - 1,
                                           part.last_line) if line is not None)  # fmt: skip
                uploads = _PartUploads(part, self._update)
                found = await client.create(requests, batch.endpoint, _metadata(part), uploads)
                part = uploads.part
            part = await self._record(part, found, created=True)
        provider_id = part.provider_batch_id
        if part.state is PartState.SUBMITTED and provider_id is not None:
            if part.stop is not None and not part.stop_sent:
                state = await client.cancel(provider_id)
                part = await self._record(part, state, stop_sent=True)
            elif part.next_poll_at <= now:
                part = await self._record(part, await client.retrieve(provider_id))
        if part.state is PartState.FETCHING:
            await self._fetch(batch, part, token)

    async def _record(
        self,
        part: ProviderPart,
        state: ProviderState,
        *,
        created: bool = False,
        stop_sent: bool = False,
    ) -> ProviderPart:
        """What the provider said of the batch: its ids (in the write that records its
        creation), its counts, when to look again, and whether its results are to be read."""
        now = self.clock.now_ms()
        config = self.configs[part.upstream]
        wait = part.poll_ms
        if not created and state.status == part.provider_status and not stop_sent:
            wait = min(wait * 2, int(config.batch_poll_max_seconds * 1000))  # nothing new
        elif not created:
            wait = int(config.batch_poll_seconds * 1000)
        after = max(wait, int((state.poll_after or 0) * 1000))
        values: dict[str, Any] = {
            "provider_status": state.status,
            "completed": max(part.completed, state.completed),
            "failed": max(part.failed, state.failed),
            "poll_ms": wait,
            "next_poll_at": now + after,
            "polls": part.polls + (0 if created else 1),
            "updated_at": now,
        }
        if created:
            values.update(state=PartState.SUBMITTED.value, provider_batch_id=state.id,
                          provider_file_id=state.file_id)  # fmt: skip
        if stop_sent:
            values["stop_sent"] = True
        if state.ended:
            values.update(state=PartState.FETCHING.value, output_file_id=state.output_file_id,
                          error_file_id=state.error_file_id, results_url=state.results_url,
                          errors=state.errors)  # fmt: skip
        return await self._update(part, values)

    async def _fetch(self, batch: BatchRecord, part: ProviderPart, token: str) -> None:
        """Read the ended batch's results and end each item; then the items left without one."""
        client = self.clients[part.upstream]
        state = ProviderState(
            id=part.provider_batch_id or "", status=part.provider_status or "", ended=True,
            outcome=None, completed=part.completed, failed=part.failed, total=part.requests,
            output_file_id=part.output_file_id, error_file_id=part.error_file_id,
            results_url=part.results_url,
        )  # fmt: skip
        prefix = f"job_{batch.id.removeprefix('batch_')}_"
        pending: list[ItemResult] = []
        async for result in client.results(state):
            line = _line_of(result.custom_id, prefix)
            if line is None or not part.first_line <= line <= part.last_line:
                log.warning("batch %s: the provider sent a result for %r, not one of its items",
                            batch.id, result.custom_id[:80])  # fmt: skip
                continue
            pending.append(_item_result(result))
            if len(pending) >= _PAGE:
                await self._settle(batch, pending, token)
                pending = []
        await self._settle(batch, pending, token)
        await self._close(batch, part, part.provider_status)

    async def _close(self, batch: BatchRecord, part: ProviderPart, status: str | None) -> None:
        """End the part's items that have no result, as its provider batch ended (or as it was
        stopped), then the part."""
        kind, reason = "failed", "the provider returned no result for this request"
        if part.stop == "expired" or status == "expired":
            kind, reason = "expired", "the provider batch did not run it within its window"
        elif part.stop == "cancelled" or status in ("cancelled", "canceled"):
            kind, reason = "cancelled", "the batch was cancelled before this request ran"
        elif status == "failed":
            reason = f"the provider batch failed: {_errors(part.errors)}"
        while items := await self.store.open_part_items(
            batch.id, at_provider(part.upstream), part.first_line, part.last_line, _PAGE
        ):
            failure = UpstreamFailure("provider_batch_" + kind, reason)
            results = [ItemResult(item.id, kind, failure=failure, reason=reason) for item in items]
            settled = await self.queue.settle_items(results, PROVIDER_LEASE)
            if not any(settled):  # none of them is ours to end (a caller cancelled them)
                break
        await self._update(part, {"state": PartState.DONE.value})

    async def _settle(self, batch: BatchRecord, results: list[ItemResult], token: str) -> None:
        if not results:
            return
        await self.queue.settle_items(results, PROVIDER_LEASE)
        until = self.clock.now_ms() + int(self.service.config.lease_seconds * 1000)
        if not await self.store.renew_batch_lease(batch.id, token, until):
            raise LeaseLost(f"batch {batch.id} was taken over by another runner")

    async def _trouble(self, batch: BatchRecord, part: ProviderPart, exc: UpstreamError) -> None:
        """A call to the provider failed: tried again later (with backoff), unless retrying
        cannot help, in which case the part's items fail with the provider's error."""
        now = self.clock.now_ms()
        if exc.retryable:
            config = self.configs[part.upstream]
            wait = min(part.poll_ms * 2, int(config.batch_poll_max_seconds * 1000))
            wait = max(wait, int((exc.retry_after or 0) * 1000))
            log.warning("batch %s part %d: %s; trying again in %.1f s", batch.id, part.part,
                        exc.message, wait / 1000)  # fmt: skip
            await self._update(part, {"poll_ms": wait, "next_poll_at": now + wait})
            return
        log.error("batch %s part %d: the provider refused: %s", batch.id, part.part, exc.message)
        error = {"code": exc.type, "message": exc.message, "status": exc.status}
        part = await self._update(part, {"provider_status": "failed", "errors": [error]})
        await self._close(batch, part, "failed")

    async def _fail_all(self, batch: BatchRecord, upstream: str, reason: str) -> None:
        while items := await self.store.open_part_items(batch.id, upstream, 0, _ALL_LINES, _PAGE):
            failure = UpstreamFailure("upstream_unknown", reason)
            settled = await self.queue.settle_items(
                [ItemResult(item.id, "failed", failure=failure) for item in items], PROVIDER_LEASE
            )
            if not any(settled):
                break

    async def _update(self, part: ProviderPart, values: dict[str, Any]) -> ProviderPart:
        updated = await self.store.update_part(part.id, values)
        if updated is None:
            raise StoreError(f"provider batch {part.id} is gone")
        return updated


def _metadata(part: ProviderPart) -> dict[str, str]:
    """What the provider batch carries to be found again: the hookline batch and part."""
    return {"hookline_batch_id": part.batch_id, "hookline_part": str(part.part)}


def _line_of(custom_id: str, prefix: str) -> int | None:
    """The input line of the item a result names (``job_<batch>_<line>``), if it is ours."""
    if not custom_id.startswith(prefix):
        return None
    digits = custom_id[len(prefix) :]
    return int(digits) if digits.isdigit() and len(digits) <= 9 else None


def _item_result(result: ProviderResult) -> ItemResult:
    if result.kind == "succeeded":
        return ItemResult(result.custom_id, "succeeded", output=result.output)
    if result.kind == "failed":
        failure = UpstreamFailure("upstream_error", result.message, result.status, body=result.body)
        return ItemResult(result.custom_id, "failed", failure=failure)
    reason = {"cancelled": "the batch was cancelled before this request ran",
              "expired": "the provider batch did not run it within its window"}[result.kind]  # fmt: skip
    return ItemResult(result.custom_id, result.kind, reason=reason)


def _errors(errors: list[dict[str, Any]] | None) -> str:
    if not errors:
        return "no reason given"
    return "; ".join(str(e.get("message") or e.get("code")) for e in errors[:3])


class _PartUploads:
    """A part's uploaded file (``provider_file_id``), recorded before the batch is created from
    it: an attempt after a crash between the two reuses the file, leaving no orphan behind."""

    def __init__(
        self,
        part: ProviderPart,
        update: Callable[[ProviderPart, dict[str, Any]], Awaitable[ProviderPart]],
    ) -> None:
        self.part = part
        self._update = update

    @property
    def file_id(self) -> str | None:
        return self.part.provider_file_id

    async def keep(self, file_id: str) -> None:
        self.part = await self._update(self.part, {"provider_file_id": file_id})
