"""The job queue: submission, the worker's side of the lifecycle, retries, leases and expiry.

All of the lifecycle rules live here, above the :class:`~hookline.store.base.Store` interface and
unaware of which database runs underneath: what a retry does to a job, when a lapsed lease counts as an
attempt, what each event carries. The API and the worker only call this class.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
from collections.abc import Callable, Collection, Sequence
from typing import Any

import orjson

from hookline.batching import WriteBatcher
from hookline.clock import Clock, SystemClock
from hookline.config import Settings
from hookline.errors import Conflict, NotFound
from hookline.events import Event, EventType, NewEvent
from hookline.ids import new_id
from hookline.jobs import Job, JobStatus, Operation
from hookline.live import LiveHub
from hookline.notify import DELIVERIES_AVAILABLE, Notifier
from hookline.store.base import AcceptOutcome, Store, Transitioned

JOBS_AVAILABLE = "jobs.available"
JOB_CANCELLED = "job.cancelled"
# Loop turns an adopted job's upstream call takes to send its request (its task starting, then
# aiohttp's write of the body in a task of its own), before an accept that would not yield.
_TURNS_FOR_THE_UPSTREAM_REQUEST = 2


def job_topic(job_id: str) -> str:
    return f"job:{job_id}"


@dataclasses.dataclass(frozen=True)
class SubmitRequest:
    operation: Operation
    input: dict[str, Any]
    model: str
    upstream: str
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    priority: int = 0
    ttl_seconds: float | None = None
    idempotency_key: str | None = None
    webhook: dict[str, Any] | None = None

    def fingerprint(self) -> str:
        """A hash of everything the caller sent, to tell a true retry from a reused key."""
        body = {
            "operation": self.operation.value,
            "input": self.input,
            "model": self.model,
            "metadata": self.metadata,
            "priority": self.priority,
            "ttl_seconds": self.ttl_seconds,
            "webhook": self.webhook,
        }
        return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclasses.dataclass(frozen=True)
class UpstreamFailure:
    """Why an attempt failed, as stored in ``job.error`` and carried by ``job.failed``."""

    type: str
    message: str
    status: int | None = None
    retryable: bool = False
    retry_after: float | None = None
    body: Any = None

    def as_error(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.status is not None:
            error["upstream_status"] = self.status
        if self.body is not None:
            error["upstream_body"] = self.body
        return error


class JobQueue:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        clock: Clock | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock or SystemClock()
        self.notifier = notifier or Notifier()
        self.live = LiveHub()  # committed events and live output, to the streams in this process
        # Each upstream's max_concurrency holds across all processes: claims (and accepts of
        # jobs already claimed) count the running jobs in the store.
        self.running_limits = {u.name: u.max_concurrency for u in settings.upstreams}
        self.rate_limits = {u.name: u.rate_limit for u in settings.upstreams if u.rate_limit}
        self._writer: WriteBatcher[tuple[Job, list[NewEvent]], AcceptOutcome] = WriteBatcher(
            self._insert_jobs, name="hookline-accept-writer"
        )

    async def _insert_jobs(self, items: list[tuple[Job, list[NewEvent]]]) -> list[AcceptOutcome]:
        return await self.store.insert_jobs(items, self.running_limits)

    async def close(self) -> None:
        await self._writer.stop()

    # --- the caller's side

    async def submit(
        self,
        tenant: str,
        request: SubmitRequest,
        *,
        job_id: str | None = None,
        lease_token: str | None = None,
        on_built: Callable[[Job], None] | None = None,
    ) -> tuple[Job, bool]:
        """Durably queue a job. Returns ``(job, created)``: ``created`` is False for a replayed
        idempotency key with the same request. Raises :class:`Conflict` if the key was used with a
        different request. ``job_id`` (a fresh ``new_id("job")``) lets a caller watch the job's
        live events before it exists. With ``lease_token`` the job is accepted already claimed
        (running, its first attempt started, leased under that token): a worker in this process
        that reserved room for it runs it at once, without a claim; unless its upstream already
        runs ``max_concurrency`` jobs across all processes, in which case it comes back queued. ``on_built`` is called with
        that job before it is written, so the worker can start the upstream call while the accept
        commits (it must write nothing about the job until told the accept succeeded).
        """
        fingerprint = request.fingerprint() if request.idempotency_key else None
        if request.idempotency_key:
            existing = await self.store.find_job_by_idempotency_key(tenant, request.idempotency_key)
            if existing is not None:
                return self._replayed(existing, fingerprint), False
        now = self.clock.now_ms()
        job = Job(
            id=job_id or new_id("job"),
            tenant=tenant,
            status=JobStatus.QUEUED,
            operation=request.operation,
            model=request.model,
            upstream=request.upstream,
            input=request.input,
            output=None,
            error=None,
            metadata=request.metadata,
            priority=request.priority,
            attempts=0,
            max_attempts=self.settings.jobs.max_attempts,
            idempotency_key=request.idempotency_key,
            request_hash=fingerprint,
            created_at=now,
            updated_at=now,
            started_at=None,
            finished_at=None,
            expires_at=now + int(request.ttl_seconds * 1000) if request.ttl_seconds else None,
            run_after=now,
            lease_token=None,
            lease_expires_at=None,
            event_seq=1,
            webhook=request.webhook,
        )
        first_events = [NewEvent(EventType.QUEUED, {})]
        if lease_token is not None:
            job = job.evolve(
                status=JobStatus.RUNNING,
                attempts=1,
                started_at=now,
                lease_token=lease_token,
                lease_expires_at=now + self._lease_ms,
                event_seq=2,
            )
            first_events.append(NewEvent(EventType.STARTED, {"attempt": 1}))
            if on_built is not None:
                on_built(job)
                # Let the upstream call go out before the accept's write, which may run (and
                # commit) without yielding: its answer is then on the way while the job commits.
                for _ in range(_TURNS_FOR_THE_UPSTREAM_REQUEST):
                    await asyncio.sleep(0)
        outcome = await self._writer.submit((job, first_events))
        if outcome.duplicate:
            assert request.idempotency_key is not None
            existing = await self.store.find_job_by_idempotency_key(tenant, request.idempotency_key)
            if existing is None:  # the other job vanished again: only retention could do that
                raise Conflict("idempotency key collided with a job that no longer exists")
            return self._replayed(existing, fingerprint), False
        job = outcome.job  # queued after all when its upstream had no room to run it now
        if job.lease_token is None:
            self.notifier.publish(JOBS_AVAILABLE)
        if outcome.deliveries:
            self.notifier.publish(DELIVERIES_AVAILABLE)
        return job, True

    @staticmethod
    def _replayed(existing: Job, fingerprint: str | None) -> Job:
        if existing.request_hash != fingerprint:
            raise Conflict(
                f"Idempotency-Key was already used for job {existing.id} with a different request"
            )
        return existing

    async def get(self, tenant: str, job_id: str) -> Job:
        job = await self.store.get_job(job_id, tenant)
        if job is None or job.operation is Operation.BATCH:  # a batch's anchor is not a job
            raise NotFound(f"no job {job_id!r}")
        return job

    async def list_jobs(
        self,
        tenant: str,
        *,
        statuses: Collection[JobStatus] = (),
        operations: Collection[str] = (),
        before_id: str | None = None,
        limit: int = 50,
    ) -> list[Job]:
        return await self.store.list_jobs(
            tenant, statuses=statuses, operations=operations, before_id=before_id, limit=limit
        )

    async def events(self, tenant: str, job_id: str, after_seq: int = 0) -> list[Event]:
        await self.get(tenant, job_id)  # 404 for foreign or unknown jobs
        return await self.store.list_events(job_id, after_seq)

    async def wait_until_terminal(self, tenant: str, job_id: str, timeout: float) -> Job:
        """The job once it is terminal, or as it stands when ``timeout`` seconds have passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            job = await self.get(tenant, job_id)
            remaining = deadline - loop.time()
            if job.status.is_terminal or remaining <= 0:
                return job
            # Woken at once in this process; other processes' changes are seen by the re-read.
            await self.notifier.wait(
                job_topic(job_id), min(remaining, self.settings.worker.poll_seconds)
            )

    async def cancel(self, tenant: str, job_id: str) -> Job:
        """Cancel a queued or running job; a terminal job is returned unchanged (409 is not useful)."""
        if job_id.startswith("batch_"):  # a batch's anchor: batches are cancelled as batches
            raise NotFound(f"no job {job_id!r}")
        result = await self.store.transition(
            job_id,
            JobStatus.CANCELLED,
            now=self.clock.now_ms(),
            changes={"finished_at": self.clock.now_ms(), "lease_token": None},
            events=[NewEvent(EventType.CANCELLED, {"reason": "cancelled by the caller"})],
            tenant=tenant,
        )
        if result is None:
            return await self.get(tenant, job_id)
        self._published(result)
        self.notifier.publish(JOB_CANCELLED, job_id)
        return result.job

    # --- the worker's side

    async def claim(
        self, upstream: str, limit: int, lease_token: str
    ) -> tuple[list[Job], float | None]:
        """Claim up to ``limit`` jobs of ``upstream``, within its limits across all processes.
        Also returns, when its rate limit held claims back, the seconds until the next may start."""
        now = self.clock.now_ms()
        claimed = await self.store.claim_jobs(
            upstream,
            limit,
            now=now,
            lease_token=lease_token,
            lease_expires_at=now + self._lease_ms,
            max_running=self.running_limits.get(upstream),
            rate=self.rate_limits.get(upstream),
        )
        for result in claimed.jobs:
            self._published(result)
        wait = None
        if claimed.next_token_at is not None:
            wait = max(0.0, (claimed.next_token_at - now) / 1000)
        return [result.job for result in claimed.jobs], wait

    async def renew_leases(self, job_ids: Collection[str], lease_token: str) -> set[str]:
        now = self.clock.now_ms()
        return await self.store.renew_leases(job_ids, lease_token, now + self._lease_ms, now)

    async def add_output_deltas(
        self, items: Sequence[tuple[Job, str, list[NewEvent]]]
    ) -> list[bool]:
        """Append coalesced output deltas of several jobs in one transaction; for each, False
        when the job is no longer ours (cancelled, lost)."""
        results = await self.store.append_events_many(
            [(job.id, token, deltas) for job, token, deltas in items], self.clock.now_ms()
        )
        for (job, _, _), appended in zip(items, results, strict=True):
            if appended is not None:
                self._announce(job.id, appended.events, appended.deliveries)
        return [appended is not None for appended in results]

    async def succeed(
        self,
        job: Job,
        lease_token: str,
        output: dict[str, Any],
        last_deltas: Sequence[NewEvent] = (),
    ) -> Job | None:
        """Finish the job with ``output``; ``last_deltas`` (output not written yet) go into the
        same transaction, ahead of ``job.succeeded``."""
        now = self.clock.now_ms()
        result = await self.store.transition(
            job.id,
            JobStatus.SUCCEEDED,
            now=now,
            changes={"output": output, "error": None, "finished_at": now, "lease_token": None},
            events=[*last_deltas, NewEvent(EventType.SUCCEEDED, {"attempt": job.attempts})],
            lease_token=lease_token,
        )
        return self._published(result)

    async def fail(self, job: Job, lease_token: str, failure: UpstreamFailure) -> Job | None:
        """Retry the job later if the failure allows and attempts remain; otherwise fail it."""
        now = self.clock.now_ms()
        if failure.retryable and job.attempts < job.max_attempts:
            delay = self.retry_delay(job.attempts, failure.retry_after)
            message = (
                f"attempt {job.attempts} failed ({failure.message}); retrying in {delay:.1f} s"
            )
            result = await self.store.transition(
                job.id,
                JobStatus.QUEUED,
                now=now,
                changes={
                    "error": failure.as_error(),
                    "run_after": now + int(delay * 1000),
                    "lease_token": None,
                    "lease_expires_at": None,
                },
                events=[NewEvent(EventType.LOG, {"level": "warning", "message": message})],
                lease_token=lease_token,
            )
            if result is not None:
                asyncio.get_running_loop().call_later(delay, self.notifier.publish, JOBS_AVAILABLE)
            return self._published(result)
        result = await self.store.transition(
            job.id,
            JobStatus.FAILED,
            now=now,
            changes={"error": failure.as_error(), "finished_at": now, "lease_token": None},
            events=[
                NewEvent(EventType.FAILED, {"attempt": job.attempts, "error": failure.as_error()})
            ],
            lease_token=lease_token,
        )
        return self._published(result)

    async def release(self, job: Job, lease_token: str, reason: str) -> Job | None:
        """Put a running job back in the queue without counting the attempt (worker shutdown)."""
        result = await self.store.transition(
            job.id,
            JobStatus.QUEUED,
            now=self.clock.now_ms(),
            changes={
                "attempts": max(job.attempts - 1, 0),
                "lease_token": None,
                "lease_expires_at": None,
                "run_after": self.clock.now_ms(),
            },
            events=[NewEvent(EventType.LOG, {"level": "info", "message": reason})],
            lease_token=lease_token,
        )
        if result is not None:
            self.notifier.publish(JOBS_AVAILABLE)
        return self._published(result)

    # --- batches (hookline.batches): items are jobs, a batch's events go under its anchor

    async def add_items(self, items: Sequence[Job]) -> None:
        """Queue a batch's items (already built, queued), with their ``job.queued`` events, in
        one transaction. An item written before (a resumed write) is skipped."""
        outcomes = await self.store.insert_jobs(
            [(job, NewEvent(EventType.QUEUED, {})) for job in items]
        )
        self.notifier.publish(JOBS_AVAILABLE)
        if any(outcome.deliveries for outcome in outcomes):
            self.notifier.publish(DELIVERIES_AVAILABLE)

    async def batch_progress(self, batch_id: str, batch: dict[str, Any]) -> None:
        appended = await self.store.append_events(
            batch_id, "batch", [NewEvent(EventType.BATCH_PROGRESS, batch)], self.clock.now_ms()
        )
        if appended is not None:
            self._announce(batch_id, appended.events, appended.deliveries)

    async def end_batch(self, batch_id: str, event: EventType, batch: dict[str, Any]) -> None:
        """The batch's terminal event; the anchor's conditional transition makes it happen once."""
        now = self.clock.now_ms()
        status = {
            EventType.BATCH_COMPLETED: JobStatus.SUCCEEDED,
            EventType.BATCH_FAILED: JobStatus.FAILED,
        }.get(event, JobStatus.CANCELLED)
        result = await self.store.transition(
            batch_id,
            status,
            now=now,
            changes={"finished_at": now, "lease_token": None},
            events=[NewEvent(event, batch)],
        )
        self._published(result)

    async def expire_overdue(self, limit: int = 500) -> int:
        """Expire queued jobs whose TTL passed before they started. Returns how many."""
        now = self.clock.now_ms()
        expired = 0
        for job_id in await self.store.ids_past_ttl(now, limit):
            result = await self.store.transition(
                job_id,
                JobStatus.EXPIRED,
                now=now,
                changes={"finished_at": now},
                events=[
                    NewEvent(EventType.EXPIRED, {"reason": "ttl passed before the job started"})
                ],
            )
            if self._published(result) is not None:
                expired += 1
        return expired

    async def delete_old_history(self) -> tuple[int, int]:
        """Delete finished jobs (with their events) and settled webhook messages (with their
        attempts) older than the retention, in short transactions of ``batch_size`` rows, so
        no lock is held for long. Returns (jobs, messages) deleted."""
        retention = self.settings.retention
        if retention.days <= 0:
            return 0, 0
        before = self.clock.now_ms() - int(retention.days * 86_400_000)
        counts = []
        for delete in (self.store.delete_finished_jobs, self.store.delete_settled_deliveries):
            total = 0
            while True:
                deleted = await delete(before, retention.batch_size)
                total += deleted
                if deleted < retention.batch_size:
                    break
                await asyncio.sleep(0.01)  # other writers get the database between batches
            counts.append(total)
        return counts[0], counts[1]

    async def recover_lapsed_leases(self, limit: int = 500) -> int:
        """Requeue (or fail, when out of attempts) running jobs whose worker stopped renewing."""
        recovered = 0
        for job in await self.store.lapsed_leases(self.clock.now_ms(), limit):
            assert job.lease_token is not None
            failure = UpstreamFailure(
                type="worker_lost",
                message="the worker running this job stopped renewing its lease",
                retryable=True,
            )
            if await self.fail(job, job.lease_token, failure) is not None:
                recovered += 1
        return recovered

    def retry_delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with ±20% jitter, never sooner than the upstream's Retry-After."""
        jobs = self.settings.jobs
        backoff = min(jobs.retry_max_seconds, jobs.retry_base_seconds * 2 ** (attempt - 1))
        backoff *= random.uniform(0.8, 1.2)
        return float(max(backoff, retry_after or 0.0))

    @property
    def _lease_ms(self) -> int:
        return int(self.settings.worker.lease_seconds * 1000)

    def _published(self, result: Transitioned | None) -> Job | None:
        if result is None:
            return None
        self._announce(result.job.id, result.events, result.deliveries, result.job)
        return result.job

    def _announce(
        self, job_id: str, events: list[Event], deliveries: int, job: Job | None = None
    ) -> None:
        """Tell this process what a committed write did: the streams, the long-polls, and (only
        when the outbox got messages; most jobs have no webhook) the webhook sender."""
        self.live.publish_events(events, job=job)
        self.notifier.publish(job_topic(job_id))
        if deliveries:
            self.notifier.publish(DELIVERIES_AVAILABLE)
