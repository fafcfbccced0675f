"""The job queue: submission, the worker's side of the lifecycle, retries, leases and expiry.

All of the lifecycle rules live here, above the :class:`~hookline.store.base.Store` interface and
unaware of which database runs underneath: what a retry does to a job, when a lapsed lease counts as an
attempt, what each event carries. The API, the worker and the batches (their items are jobs: a
batch's items are added, settled from a provider batch's results, and its anchor ended here, so
every job event goes through the same announcements) change jobs only through this class.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import random
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import orjson

from hookline.clock import Clock, SystemClock
from hookline.config import Settings
from hookline.errors import Conflict, LimitReached, NotFound, StoreError
from hookline.events import (
    ATTEMPT_EVENTS,
    Event,
    EventType,
    NewEvent,
    attempt_json,
    attempts_of,
)
from hookline.fairness import (
    DEFAULT_OUTPUT_TOKENS,
    NO_KEY_LIMITS,
    FairPolicy,
    Hold,
    KeyLimits,
    budget_periods,
    estimate_tokens,
    holding,
    jobs_ahead,
    usage_of,
)
from hookline.ids import new_id
from hookline.jobs import Job, JobStatus, Lane, Operation, iso
from hookline.live.hub import LiveHub
from hookline.live.notify import (
    DELIVERIES_AVAILABLE,
    JOB_CANCELLED,
    JOBS_AVAILABLE,
    TENANT_ACCEPTED,
    Notifier,
    job_topic,
)
from hookline.observability import Telemetry
from hookline.routing import CIRCUIT_TOPIC, Router
from hookline.store.base import Change, Store, Transitioned

_SPENT_CACHE_MS = 1000  # how long a tenant's tokens spent are taken as read (its budget)
# Loop turns an adopted job's upstream call takes to send its request (its task starting, then
# aiohttp's write of the body in a task of its own), before an accept that would not yield.
_TURNS_FOR_THE_UPSTREAM_REQUEST = 2
# A queued job's position counts at most this many jobs ahead; its estimated start comes from
# the jobs its upstream finished in this window.
_POSITION_CAP = 100_000
_THROUGHPUT_WINDOW_MS = 300_000


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
    lane: Lane = Lane.DEFAULT  # who waits on it (hookline.fairness): not part of the request

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

    def as_error(self, *, body: bool = True) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.status is not None:
            error["upstream_status"] = self.status
        if body and self.body is not None:
            error["upstream_body"] = self.body
        return error


@dataclasses.dataclass(frozen=True)
class ItemResult:
    """How an item that ran elsewhere (a provider batch) ended (:meth:`JobQueue.settle_items`)."""

    job_id: str
    kind: str  # succeeded | failed | cancelled | expired
    output: dict[str, Any] | None = None
    failure: UpstreamFailure | None = None
    reason: str = ""


def _first_events(job: Job) -> list[NewEvent]:
    """A new job's first events: ``job.queued``, and ``job.started`` for one written running
    (a batch item sent to a provider batch)."""
    if job.status is JobStatus.RUNNING:
        return [NewEvent(EventType.QUEUED, {}),
                NewEvent(EventType.STARTED, {"attempt": job.attempts, "upstream": job.upstream})]  # fmt: skip
    return [NewEvent(EventType.QUEUED, {})]


class JobQueue:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        clock: Clock | None = None,
        notifier: Notifier | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.store = store
        self.telemetry = telemetry or Telemetry()
        self.settings = settings
        self.clock = clock or SystemClock()
        self.notifier = notifier or Notifier()
        self.live = LiveHub()  # committed events and live output, to the streams in this process
        # Each upstream's max_concurrency holds across all processes: claims (and accepts of
        # jobs already claimed) count the running jobs in the store.
        self.running_limits = {u.name: u.max_concurrency for u in settings.upstreams}
        self.rate_limits = {u.name: u.rate_limit for u in settings.upstreams if u.rate_limit}
        # Routes, fallback and circuit breakers; a circuit's change crosses to the other
        # processes as a notifier topic.
        self.router = Router(settings, self.clock, self.notifier.publish)
        self.notifier.subscribe(CIRCUIT_TOPIC, self.router.apply)
        self.fair = FairPolicy.from_settings(settings)  # lanes, tenants' weights and limits
        # tenant, or ("key", key id) -> (until, day, month): tokens spent, read lately
        self._spent_cache: dict[str | tuple[str, str], tuple[int, int, int]] = {}
        # An API key's own limits, set when it is created and never changed: read once.
        self._key_limits: dict[str, KeyLimits] = {}

    async def close(self) -> None:
        """Nothing to drain: an accept is written before ``submit`` returns."""

    # --- the caller's side

    async def submit(
        self,
        tenant: str,
        request: SubmitRequest,
        *,
        job_id: str | None = None,
        lease_token: str | None = None,
        on_built: Callable[[Job], None] | None = None,
        refuse_when_held: bool = False,
        key_id: str | None = None,
        key_limits: KeyLimits | None = None,
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
        A tenant whose token budget is spent gets :class:`LimitReached`; so does one at a limit
        that keeps the job from starting now, with ``refuse_when_held`` (a caller who would
        rather try again than wait in the queue). ``key_id`` is the API key that submits it, and
        ``key_limits`` that key's own limits, which hold the job as the tenant's do (a job of a
        key with limits is never accepted already running: the claim holds it to them).
        """
        began = time.perf_counter()
        fingerprint = request.fingerprint() if request.idempotency_key else None
        if request.idempotency_key:
            existing = await self.store.find_job_by_idempotency_key(tenant, request.idempotency_key)
            if existing is not None:
                return self._replayed(existing, fingerprint), False
        if key_id is not None and key_limits is not None:
            self._remember_key(key_id, key_limits)
        own = key_limits or NO_KEY_LIMITS
        await self.check_budget(tenant, key_id)
        if refuse_when_held:
            await self._refuse_if_held(tenant, request, key_id)
        if own.in_claim:
            lease_token = None
        now = self.clock.now_ms()
        job = Job.new(
            id=job_id or new_id("job"), tenant=tenant, operation=request.operation, now=now,
            max_attempts=self.settings.jobs.max_attempts, model=request.model,
            upstream=request.upstream, input=request.input, metadata=request.metadata,
            priority=request.priority,
            expires_at=now + int(request.ttl_seconds * 1000) if request.ttl_seconds else None,
            idempotency_key=request.idempotency_key, request_hash=fingerprint,
            webhook=request.webhook, traceparent=self.telemetry.tracing.current_traceparent(),
            lane=request.lane, expected_tokens=self._expected_tokens(tenant, request, own),
            key_id=key_id,
        )  # fmt: skip
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
            first_events.append(
                NewEvent(EventType.STARTED, {"attempt": 1, "upstream": job.upstream})
            )
            if on_built is not None:
                on_built(job)
                # Let the upstream call go out before the accept's write, which may run (and
                # commit) without yielding: its answer is then on the way while the job commits.
                for _ in range(_TURNS_FOR_THE_UPSTREAM_REQUEST):
                    await asyncio.sleep(0)
        # Accepts that arrive together are written together (the store groups them).
        outcome = await self.store.accept_job(
            job, first_events, self.running_limits.get(job.upstream), self.fair
        )
        if outcome.duplicate:
            if request.idempotency_key is None:  # the store reports only a reused key so
                raise StoreError(f"job {job.id} was refused as a duplicate without a key")
            existing = await self.store.find_job_by_idempotency_key(tenant, request.idempotency_key)
            if existing is None:  # the other job vanished again: only retention could do that
                raise Conflict("idempotency key collided with a job that no longer exists")
            return self._replayed(existing, fingerprint), False
        job = outcome.job  # queued after all when its upstream had no room to run it now
        self.telemetry.accepted(job, time.perf_counter() - began)
        self.notifier.publish(TENANT_ACCEPTED, tenant)
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

    async def attempt_log(self, job: Job) -> list[dict[str, Any]]:
        """The job's attempts that count (as many as ``job.attempts``), each with its upstream,
        the model that upstream is asked for, its times, outcome and error, as the API shows
        them. Reads the store unless the job has not started yet."""
        if job.attempts == 0:
            return []
        events = await self.store.list_events(job.id, types=ATTEMPT_EVENTS)
        router = self.router
        return [
            attempt_json(a, None if a.upstream is None else router.model_for(job.model, a.upstream))
            for a in attempts_of(events, counted=job.attempts)
        ]

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

    async def position(self, job: Job) -> dict[str, Any] | None:
        """Where a queued job stands (None for any other): ``position`` among the jobs waiting
        for the same upstream (1: next), counting only those that start before it under fair
        sharing (the lanes before its own, its tenant's before it, and of each other tenant in
        its lane the share its weight gets meanwhile), and ``estimated_start_seconds`` from that
        upstream's throughput of the last minutes (None while it has finished nothing lately)."""
        if job.status is not JobStatus.QUEUED:
            return None
        now = self.clock.now_ms()
        queue = await self.store.queue_position(job, now - _THROUGHPUT_WINDOW_MS, _POSITION_CAP)
        stored = (
            await self.store.keys.weights([job.tenant, *queue.other_tenants])
            if queue.other_tenants
            else {}
        )
        ahead = queue.earlier_lanes + jobs_ahead(
            self.fair, job.tenant, queue.own_tenant, queue.other_tenants, stored
        )
        finished = queue.finished
        rate = finished / (_THROUGHPUT_WINDOW_MS / 1000)  # jobs a second
        retry_wait = max(0.0, (job.run_after - now) / 1000)
        estimate: float | None = retry_wait if ahead == 0 else None
        if rate > 0:
            estimate = max(retry_wait, ahead / rate)
        return {
            "position": ahead + 1,
            "upstream": job.upstream,
            "estimated_start_seconds": None if estimate is None else round(estimate, 1),
        }

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
        """Claim up to ``limit`` jobs of ``upstream``, fairly and within its limits and its
        tenants' across all processes. Also returns, when a limit held claims back, the seconds
        until the next may start (``inf``: not before a running job ends)."""
        now = self.clock.now_ms()
        claimed = await self.store.claim_jobs(
            upstream,
            limit,
            now=now,
            lease_token=lease_token,
            lease_expires_at=now + self._lease_ms,
            max_running=self.running_limits.get(upstream),
            rate=self.rate_limits.get(upstream),
            policy=self.fair,
        )
        for result in claimed.jobs:
            self._published(result)
        wait = math.inf if claimed.held_back else None
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

    async def record_upstream_response(self, job: Job, lease_token: str, response_id: str) -> bool:
        """Record, under the job's lease, the upstream's id of the background response that
        runs this attempt (a ``job.progress`` event); False when the job is no longer ours."""
        data = {"attempt": job.attempts, "upstream": job.upstream,
                "upstream_response": {"id": response_id}}  # fmt: skip
        event = NewEvent(EventType.PROGRESS, data)
        return (await self.add_output_deltas([(job, lease_token, [event])]))[0]

    async def upstream_response_of(self, job: Job) -> str | None:
        """The background response last recorded for the job on its current upstream, if any:
        an attempt after a crash follows it instead of creating another."""
        for event in reversed(await self.store.list_events(job.id, types=(EventType.PROGRESS,))):
            found = event.data.get("upstream_response")
            if event.data.get("upstream") == job.upstream and isinstance(found, dict):
                response_id = found.get("id")
                if isinstance(response_id, str) and response_id:
                    return response_id
        return None

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
        changes = {"output": output, "error": None, "finished_at": now, "lease_token": None}
        usage = usage_of(output)
        if usage is not None:
            changes["input_tokens"], changes["output_tokens"] = usage
        metered = usage is not None and self.fair.metered(job.tenant, job.upstream)
        result = await self.store.transition(
            job.id,
            JobStatus.SUCCEEDED,
            now=now,
            changes=changes,
            events=[*last_deltas, NewEvent(EventType.SUCCEEDED, {"attempt": job.attempts})],
            lease_token=lease_token,
            settle_tokens=sum(usage) if usage is not None and metered else None,
        )
        return self._published(result)

    async def keep_cancelled_output(self, job: Job, output: dict[str, Any]) -> bool:
        """Record the output (and usage) a job's attempt had produced when the job was cancelled
        under it; False when the job is not cancelled (its lease was lost) or ran again since."""
        usage = usage_of(output)
        return await self.store.keep_cancelled_output(
            job.id, job.attempts, output, usage, self.clock.now_ms()
        )

    async def fail(self, job: Job, lease_token: str, failure: UpstreamFailure) -> Job | None:
        """Retry the job later if the failure allows and attempts remain; otherwise fail it."""
        now = self.clock.now_ms()
        if failure.retryable and job.attempts < job.max_attempts:
            # A route's next target is tried at once; the same upstream after the backoff.
            choice = self.router.fallback(job.model, job.operation.value, job.upstream)
            delay = 0.0 if choice.immediate else self.retry_delay(job.attempts, failure.retry_after)
            message = (
                f"attempt {job.attempts} failed ({failure.message}); retrying in {delay:.1f} s"
            )
            changes: dict[str, Any] = {
                "error": failure.as_error(),
                "run_after": now + int(delay * 1000),
                "lease_token": None,
                "lease_expires_at": None,
            }
            if choice.upstream != job.upstream:
                changes["upstream"] = choice.upstream
                message = (
                    f"attempt {job.attempts} failed on {job.upstream} ({failure.message}); "
                    f"falling back to {choice.upstream}"
                    + ("" if choice.immediate else f", retrying in {delay:.1f} s")
                )
            log = {"level": "warning", "message": message, "attempt": job.attempts,
                   "upstream": job.upstream, "error": failure.as_error(body=False)}  # fmt: skip
            result = await self.store.transition(
                job.id,
                JobStatus.QUEUED,
                now=now,
                changes=changes,
                events=[NewEvent(EventType.LOG, log)],
                lease_token=lease_token,
            )
            if result is not None:
                self.telemetry.retried(job, failure.type, delay)
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
        items = [
            job.evolve(expected_tokens=estimate_tokens(job.operation, job.input))
            if self.fair.counts_tokens(job.tenant, job.upstream)
            else job
            for job in items
        ]
        outcomes = await self.store.insert_jobs([(job, _first_events(job)) for job in items])
        for outcome in outcomes:  # (an item written before, by a resumed write, is a duplicate)
            if not outcome.duplicate:
                self.telemetry.accepted(outcome.job, None)
        self.notifier.publish(JOBS_AVAILABLE)
        for tenant in {job.tenant for job in items}:
            self.notifier.publish(TENANT_ACCEPTED, tenant)
        if any(outcome.deliveries for outcome in outcomes):
            self.notifier.publish(DELIVERIES_AVAILABLE)

    async def settle_items(
        self, results: Sequence[ItemResult], lease_token: str
    ) -> list[Job | None]:
        """End items that ran elsewhere (a provider batch), each held under ``lease_token``:
        all in one transaction, each item at most once (one no longer held is left as it is,
        and comes back None)."""
        now = self.clock.now_ms()
        changes: list[Change] = []
        positions: list[int] = []  # the change whose outcome is each result's
        for result in results:
            done = {"finished_at": now, "lease_token": None}
            if result.kind == "succeeded":
                output = result.output or {}
                values: dict[str, Any] = {**done, "output": output, "error": None}
                usage = usage_of(output)
                if usage is not None:
                    values["input_tokens"], values["output_tokens"] = usage
                event = NewEvent(EventType.SUCCEEDED, {"attempt": 1})
                changes.append(Change(result.job_id, JobStatus.SUCCEEDED, values, [event],
                                      lease_token))  # fmt: skip
            elif result.kind == "failed":
                error = (result.failure or UpstreamFailure("upstream_error", "failed")).as_error()
                event = NewEvent(EventType.FAILED, {"attempt": 1, "error": error})
                changes.append(Change(result.job_id, JobStatus.FAILED, {**done, "error": error},
                                      [event], lease_token))  # fmt: skip
            elif result.kind == "cancelled":
                event = NewEvent(EventType.CANCELLED, {"reason": result.reason})
                changes.append(Change(result.job_id, JobStatus.CANCELLED, done, [event],
                                      lease_token))  # fmt: skip
            else:  # expired: a job expires from the queue, so it goes back there first
                requeued = {"lease_token": None, "lease_expires_at": None}
                changes.append(Change(result.job_id, JobStatus.QUEUED, requeued, [], lease_token))
                event = NewEvent(EventType.EXPIRED, {"reason": result.reason})
                changes.append(Change(result.job_id, JobStatus.EXPIRED, {"finished_at": now},
                                      [event]))  # fmt: skip
            positions.append(len(changes) - 1)
        outcomes = await self.store.transition_many(changes, now)
        return [self._published(outcomes[i]) for i in positions]

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

    async def delete(self, tenant: str, job_id: str) -> bool:
        """Delete a finished job of the tenant with its events; False when there is none."""
        return await self.store.delete_job(job_id, tenant)

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

    # --- fair sharing: what a caller sees of its limits (hookline.fairness)

    async def check_budget(self, tenant: str, key_id: str | None = None) -> None:
        """Raise :class:`LimitReached` (with the operator's status) when the tenant's daily or
        monthly token budget is spent, or that of the API key ``key_id``: nothing new of it is
        accepted until the next period."""
        limits = self.fair.limits(tenant)
        own = await self.key_limits(key_id)
        if limits.daily_token_budget is not None or limits.monthly_token_budget is not None:
            await self._check_spent(
                tenant, f"tenant {tenant!r}", limits.daily_token_budget,
                limits.monthly_token_budget, None,
            )  # fmt: skip
        if key_id is not None and own.budgeted:
            await self._check_spent(
                tenant, f"API key {key_id!r}", own.daily_token_budget,
                own.monthly_token_budget, key_id,
            )  # fmt: skip

    async def _check_spent(
        self, tenant: str, who: str, daily: int | None, monthly: int | None, key_id: str | None
    ) -> None:
        now = self.clock.now_ms()
        _, day_end, _, month_end = budget_periods(now)
        spent_day, spent_month = await self._spent(tenant, now, daily, monthly, key_id)
        for budget, spent, period, end in (
            (daily, spent_day, "daily", day_end),
            (monthly, spent_month, "monthly", month_end),
        ):
            if budget is not None and spent >= budget:
                raise LimitReached(
                    f"{who} has spent its {period} token budget ({spent:,} of "
                    f"{budget:,} tokens); it renews at {iso(end)}",
                    kind="budget_exhausted",
                    status=self.settings.fairness.budget_status,
                    retry_after=(end - now) / 1000,
                )

    async def _spent(
        self, tenant: str, now: int, daily: int | None, monthly: int | None, key_id: str | None
    ) -> tuple[int, int]:
        """Tokens the tenant (or its key ``key_id``) spent today and this month, read at most
        once a second."""
        entry: str | tuple[str, str] = tenant if key_id is None else ("key", key_id)
        cached = self._spent_cache.get(entry)
        if cached is not None and now < cached[0]:
            return cached[1], cached[2]
        day, _, month, _ = budget_periods(now)
        spent_day = spent_month = 0
        if daily is not None:
            spent_day = await self.store.tokens_spent(tenant, day, key_id)
        if monthly is not None:
            spent_month = await self.store.tokens_spent(tenant, month, key_id)
        if len(self._spent_cache) > 10_000:
            self._spent_cache.clear()
        self._spent_cache[entry] = (now + _SPENT_CACHE_MS, spent_day, spent_month)
        return spent_day, spent_month

    def _remember_key(self, key_id: str, limits: KeyLimits) -> None:
        if len(self._key_limits) > 10_000:
            self._key_limits.clear()
        self._key_limits[key_id] = limits

    async def key_limits(self, key_id: str | None) -> KeyLimits:
        """The API key's own limits (none for None, or a key no longer stored)."""
        if key_id is None:
            return NO_KEY_LIMITS
        limits = self._key_limits.get(key_id)
        if limits is None:
            found = await self.store.keys.get(key_id)
            limits = NO_KEY_LIMITS if found is None else found.limits
            self._remember_key(key_id, limits)
        return limits

    async def hold(
        self, tenant: str, upstream: str, tokens: int, key_id: str | None = None
    ) -> Hold | None:
        """The limit that keeps a call of ``tokens`` of the tenant (and of its API key
        ``key_id``) on ``upstream`` from starting now, if any (read from the store: across
        every process)."""
        own = await self.key_limits(key_id)
        if (
            not own.in_claim
            and not self.fair.limited(tenant)
            and upstream not in self.fair.upstream_tokens_per_minute
        ):
            return None
        key = key_id if own.in_claim else None
        state = await self.store.limit_state(tenant, [upstream], self.clock.now_ms(), key)
        return holding(
            self.fair, tenant, upstream, running=state.running, window=state.window,
            tokens=tokens, key=None if key is None else (key, own, state.key_running),
        )  # fmt: skip

    async def waiting_for(self, job: Job) -> dict[str, Any]:
        """For a queued job that a limit holds back, what the API shows of it: the limit
        (``waiting_for``) and when it may start (``expected_start_at``); else nothing."""
        if job.status is not JobStatus.QUEUED:
            return {}
        hold = await self.hold(
            job.tenant, job.upstream, job.expected_tokens or DEFAULT_OUTPUT_TOKENS, job.key_id
        )
        if hold is None:
            return {}
        return {"waiting_for": hold.kind, "expected_start_at": iso(hold.until)}

    async def _refuse_if_held(
        self, tenant: str, request: SubmitRequest, key_id: str | None = None
    ) -> None:
        own = await self.key_limits(key_id)
        tokens = self._expected_tokens(tenant, request, own) or 0
        hold = await self.hold(tenant, request.upstream, tokens, key_id)
        if hold is None:
            return
        now = self.clock.now_ms()
        raise LimitReached(
            f"{hold.message}: try again later",
            kind=hold.kind,
            retry_after=max((hold.until - now) / 1000, 1.0) if hold.until else 1.0,
        )

    def _expected_tokens(
        self, tenant: str, request: SubmitRequest, key_limits: KeyLimits = NO_KEY_LIMITS
    ) -> int | None:
        """The tokens a start of this request reserves, where a token limit applies to it."""
        if key_limits.tokens_per_minute is None and not self.fair.counts_tokens(
            tenant, request.upstream
        ):
            return None
        return estimate_tokens(request.operation, request.input)

    @property
    def _lease_ms(self) -> int:
        return int(self.settings.worker.lease_seconds * 1000)

    def _published(self, result: Transitioned | None) -> Job | None:
        if result is None:
            return None
        self.telemetry.job_changed(result.job)
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
