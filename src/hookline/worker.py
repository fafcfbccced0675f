"""The worker: claims queued jobs, runs them against their upstream, and records what happens.

Per upstream it keeps at most ``max_concurrency`` jobs in flight. Each claim takes a fresh lease
token; a heartbeat renews the leases, and a job whose lease cannot be renewed (cancelled by its
caller, or taken over after a stall) has its upstream call aborted at once. Streamed output is buffered
per job and written as one ``job.output.delta`` event per choice every ``delta_flush_seconds``, never
per token. On stop, the worker claims nothing more, lets running jobs finish for ``drain_seconds``,
then puts the rest back in the queue without counting the attempt.

A chat job of an upstream with ``upstream_mode = "background"`` runs as a background response
(:mod:`hookline.upstreams.background`): its id is recorded with the job at once, the attempt
after a crash follows the same response, and cancelling the job cancels it at the provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import stamina

from hookline.config import WorkerConfig
from hookline.errors import NotFound, StoreError, StoreUnavailable
from hookline.events import EventType, NewEvent
from hookline.ids import new_id
from hookline.jobs import Job, JobStatus, Operation
from hookline.live.hub import LiveDelta, LiveHub
from hookline.live.notify import JOB_CANCELLED, JOBS_AVAILABLE, UPSTREAM_RESPONSE
from hookline.observability import logs
from hookline.queue import JobQueue, UpstreamFailure
from hookline.upstreams.background import BackgroundResponses
from hookline.upstreams.base import Upstream, UpstreamError

log = logging.getLogger("hookline.worker")
_CLAIM_BATCH = 100


class EarlyStart:
    """The facade's fast path: a job accepted already claimed, run in a slot this process's worker
    took before the accept, with no claim transaction and no wait for the claim loop.

    The accept is written with :attr:`lease_token`; :meth:`on_built` (only when ``overlaps``)
    starts the upstream call as soon as the job is built, while its accept commits, and the call
    is aborted if the accept does not land as ours. Then exactly one of :meth:`settle` (the
    accept returned) or :meth:`abandon` (it raised) hands the slot on or gives it back.
    """

    def __init__(self, worker: Worker, upstream: str, lease_token: str, overlaps: bool) -> None:
        self.worker = worker
        self.upstream = upstream
        self.lease_token = lease_token
        self.overlaps = overlaps
        self._accepted: asyncio.Future[bool] | None = (
            asyncio.get_running_loop().create_future() if overlaps else None
        )
        self._started = False

    def on_built(self, job: Job) -> None:
        assert self._accepted is not None
        self._started = True
        self.worker.adopt(job, self.lease_token, self._accepted)

    def settle(self, job: Job, created: bool) -> None:
        """The accept returned ``job``: it runs here if it was created under our lease (else it
        was queued, the upstream full across processes, or it is an idempotent replay)."""
        claimed = created and job.lease_token == self.lease_token
        if self._accepted is not None and self._started:
            self._accepted.set_result(claimed)
        elif claimed:
            self.worker.adopt(job, self.lease_token)
        else:
            self.worker.unreserve(self.upstream)

    def abandon(self) -> None:
        """The accept failed: a call already started is aborted and its slot freed."""
        if self._accepted is not None and self._started:
            self._accepted.set_result(False)
        else:
            self.worker.unreserve(self.upstream)


@dataclasses.dataclass
class RunningJob:
    job: Job
    lease_token: str
    live: LiveHub
    task: asyncio.Task[None] | None = None
    pending: dict[int, list[str]] = dataclasses.field(default_factory=dict)
    produced: dict[int, int] = dataclasses.field(default_factory=dict)  # characters per choice
    flushed: dict[int, int] = dataclasses.field(default_factory=dict)
    releasing: bool = False
    # The periodic output write this job's text is in, while it commits: the job's last write
    # waits for it, or (on PostgreSQL, where the two may commit in either order) the success could
    # commit first, and the lease-fenced output write would then be refused and its text lost.
    flushing: asyncio.Future[None] | None = None
    # Set for a job started while its accept commits: True once it is on disk, False if it never
    # will be. Nothing about the job is written before it is True.
    accepted: asyncio.Future[bool] | None = None
    first_output_at: float | None = None  # time.time() of the attempt's first text (metrics)
    # The upstream's output so far (its assembler's), kept if the job is cancelled under it.
    output_so_far: Callable[[], dict[str, Any]] | None = None
    # The provider's id of the background response this attempt follows, once known.
    upstream_response: str | None = None

    def track_output(self, so_far: Callable[[], dict[str, Any]]) -> None:
        self.output_so_far = so_far

    @property
    def on_disk(self) -> bool:
        accepted = self.accepted
        return accepted is None or (
            accepted.done() and not accepted.cancelled() and accepted.result()
        )

    def add_delta(self, index: int, text: str) -> None:
        """Called per upstream chunk: straight to live watchers, and buffered for the log.
        Text of a job still being accepted is only buffered: nobody may see output of a job
        that might never exist (see :meth:`publish_held`)."""
        if self.first_output_at is None:
            self.first_output_at = time.time()
        offset = self.produced.get(index, 0)
        self.produced[index] = offset + len(text)
        self.pending.setdefault(index, []).append(text)
        if self.on_disk:
            job = self.job
            self.live.publish_delta(
                LiveDelta(job.id, job.tenant, job.attempts, index, offset, text)
            )

    def publish_held(self) -> None:
        """The accept committed: show the text produced meanwhile. A flush may have come between
        the commit and this call (the job counts as on disk from the commit): its text goes to the
        watchers as its durable event, so what is held starts where that flush ended."""
        job = self.job
        for index, parts in sorted(self.pending.items()):
            if parts:
                offset = self.flushed.get(index, 0)
                delta = LiveDelta(job.id, job.tenant, job.attempts, index, offset, "".join(parts))
                self.live.publish_delta(delta)

    def take_deltas(self) -> list[NewEvent]:
        if not self.pending:
            return []
        pending, self.pending = self.pending, {}
        events = []
        for index, parts in sorted(pending.items()):
            text = "".join(parts)
            offset = self.flushed.get(index, 0)
            self.flushed[index] = offset + len(text)
            data = {"attempt": self.job.attempts, "index": index, "offset": offset, "text": text}
            events.append(NewEvent(EventType.OUTPUT_DELTA, data))
        return events


class Worker:
    def __init__(
        self, queue: JobQueue, upstreams: dict[str, Upstream], config: WorkerConfig
    ) -> None:
        self.queue = queue
        self.upstreams = upstreams
        self.config = config
        self.running: dict[str, RunningJob] = {}
        self._active: Counter[str] = Counter()
        self._wake = asyncio.Event()
        # Whether queued jobs may be waiting: a freed slot wakes the claim loop only then, so the
        # end of a job that was accepted already claimed (a facade stream) costs no claim.
        self._maybe_queued = True
        self._announced = 0  # "jobs available" notifications seen
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []
        self._unsubscribe: list[Any] = []
        self._background = {
            name: BackgroundResponses(upstream.config)
            for name, upstream in upstreams.items()
            if upstream.config.upstream_mode == "background"
        }
        self._pokes: dict[str, asyncio.Event] = {}  # background response id -> its attempt's

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()
        if self._stopping:  # stopped while an upstream started: the stop closed them already
            return
        notifier = self.queue.notifier
        self._unsubscribe = [
            notifier.subscribe(JOBS_AVAILABLE, self._jobs_available),
            notifier.subscribe(JOB_CANCELLED, self._abort),
            notifier.subscribe(UPSTREAM_RESPONSE, self._poke),
        ]
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="hookline-claim"),
            asyncio.create_task(self._flush_loop(), name="hookline-flush"),
            asyncio.create_task(self._heartbeat_loop(), name="hookline-heartbeat"),
            asyncio.create_task(self._maintenance_loop(), name="hookline-maintenance"),
            asyncio.create_task(self._retention_loop(), name="hookline-retention"),
        ]

    async def stop(self, grace: float | None = None) -> None:
        """Drain: claim nothing more, wait up to ``grace`` seconds, requeue what still runs. Also
        stops a worker whose :meth:`start` failed or has not finished."""
        grace = self.config.drain_seconds if grace is None else grace
        self._stopping = True
        self._wake.set()
        if self._loops:  # let a claim in flight land
            await asyncio.gather(self._loops[0], return_exceptions=True)
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for running in list(self.running.values()):
            running.releasing = True
            if running.task is not None:
                running.task.cancel()
        leftovers = [r.task for r in self.running.values() if r.task is not None]
        if leftovers:
            await asyncio.wait(leftovers)
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        for upstream in self.upstreams.values():
            await upstream.close()
        for background in self._background.values():
            await background.close()

    # --- loops

    def _jobs_available(self, _: object = None) -> None:
        self._announced += 1
        self._maybe_queued = True
        self._wake.set()

    def _slot_freed(self) -> None:
        if self._maybe_queued:
            self._wake.set()

    async def _claim_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            more = False
            maybe_queued = False
            announced = self._announced
            wait = self.config.poll_seconds
            for name in self.upstreams:
                try:
                    claimed_all, token_wait = await self._claim_for(name)
                except StoreError as exc:
                    log.warning("claiming jobs failed: %s", exc)
                    maybe_queued = True
                    continue
                more |= claimed_all
                # No room to look, or all it asked for came: more may be queued.
                maybe_queued |= claimed_all or self._free(name) <= 0
                if token_wait is not None:  # rate-limited: try again when a call may start
                    wait = min(wait, max(token_wait, 0.005))
                    maybe_queued = True
            self._maybe_queued = maybe_queued or self._announced != announced
            if not more:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()

    async def _claim_for(self, name: str) -> tuple[bool, float | None]:
        """Claim what this worker has room for; (whether it got all it asked, and the seconds
        until the upstream's rate limit lets another call start, when it held claims back)."""
        free = self._free(name)
        if free <= 0:
            return False, None
        want = min(free, _CLAIM_BATCH)
        token = new_id("lease")
        jobs, token_wait = await self.queue.claim(name, want, token)
        for job in jobs:
            self._active[name] += 1
            self._start(RunningJob(job, token, self.queue.live))
        return len(jobs) == want, token_wait

    def running_per_upstream(self) -> dict[str, int]:
        """Jobs running here (and slots reserved), per upstream."""
        return {name: n for name, n in self._active.items() if n}

    def _free(self, name: str) -> int:
        return self.upstreams[name].config.max_concurrency - self._active[name]

    def _start(self, running: RunningJob) -> asyncio.Task[None]:
        job_id = running.job.id
        self.running[job_id] = running
        self.queue.live.running.add(job_id)
        running.task = asyncio.create_task(self._execute(running), name=f"job-{job_id}")
        return running.task

    # --- jobs handed over at accept time (the OpenAI facade's streams)

    def early_start(self, upstream: str, *, overlap: bool) -> EarlyStart | None:
        """A slot of ``upstream`` for a job about to be accepted already claimed (None: stopping,
        full, or rate-limited). With ``overlap`` the upstream call may start while the accept
        is still being written (see :class:`EarlyStart`)."""
        if not self.reserve(upstream):
            return None
        return EarlyStart(self, upstream, new_id("lease"), overlap)

    def reserve(self, upstream: str) -> bool:
        """Take a slot of ``upstream`` for a job about to be accepted already claimed; False when
        the worker is stopping or the upstream is at its concurrency."""
        target = self.upstreams.get(upstream)
        if self._stopping or target is None or target.config.rate_limit is not None:
            return False  # a rate-limited upstream's calls start only through a claim
        if self._active[upstream] >= target.config.max_concurrency:
            return False
        self._active[upstream] += 1
        return True

    def unreserve(self, upstream: str) -> None:
        self._active[upstream] -= 1
        self._slot_freed()

    def adopt(
        self, job: Job, lease_token: str, accepted: asyncio.Future[bool] | None = None
    ) -> None:
        """Run a job accepted already claimed under ``lease_token`` in the slot :meth:`reserve`
        took: no claim transaction, no wait for the claim loop. With ``accepted`` the job is
        still being written: the upstream call starts now, and is aborted if it resolves False."""
        running = RunningJob(job, lease_token, self.queue.live, accepted=accepted)
        task = self._start(running)
        if accepted is not None:

            def settle(future: asyncio.Future[bool]) -> None:
                if future.cancelled() or not future.result():
                    task.cancel()  # never written (or not as ours): nothing to record or send
                else:
                    running.publish_held()

            accepted.add_done_callback(settle)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.delta_flush_seconds)
            try:
                await self._flush(*(r for r in self.running.values() if r.on_disk))
            except StoreError as exc:
                log.warning("writing output deltas failed: %s", exc)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            by_token: dict[str, list[str]] = {}
            for job_id, running in self.running.items():
                if running.on_disk:
                    by_token.setdefault(running.lease_token, []).append(job_id)
            for token, ids in by_token.items():
                try:
                    held = await self.queue.renew_leases(ids, token)
                except StoreError as exc:
                    log.warning("renewing leases failed: %s", exc)
                    continue
                for job_id in set(ids) - held:
                    self._abort(job_id)

    async def _maintenance_loop(self) -> None:
        while True:
            try:
                await self.queue.expire_overdue()
                await self.queue.recover_lapsed_leases()
            except StoreError as exc:
                log.warning("queue maintenance failed: %s", exc)
            await asyncio.sleep(self.config.maintenance_seconds)

    async def _retention_loop(self) -> None:
        interval = self.queue.settings.retention.interval_seconds
        await asyncio.sleep(random.uniform(0, interval))  # workers started together spread out
        while True:
            try:
                jobs, messages = await self.queue.delete_old_history()
                if jobs or messages:
                    log.info("retention: deleted %d jobs and %d webhook messages", jobs, messages)
            except StoreError as exc:
                log.warning("retention cleanup failed: %s", exc)
            await asyncio.sleep(interval)

    def _poke(self, response_id: str) -> None:
        """A webhook says this background response changed: its attempt looks at once."""
        poke = self._pokes.get(response_id)
        if poke is not None:
            poke.set()

    # --- one job

    def _abort(self, job_id: str) -> None:
        """Stop working on a job that is no longer ours (cancelled, or its lease was lost)."""
        running = self.running.get(job_id)
        if running is not None and running.task is not None and not running.releasing:
            running.task.cancel()

    async def _flush(self, *runs: RunningJob) -> None:
        """Write the buffered output of these jobs, all in one transaction."""
        flushed = [(r, deltas) for r in runs if (deltas := r.take_deltas())]
        if not flushed:
            return
        done = asyncio.get_running_loop().create_future()
        for running, _ in flushed:
            running.flushing = done
        items = [(r.job, r.lease_token, deltas) for r, deltas in flushed]
        try:
            written = await self.queue.add_output_deltas(items)
        finally:
            done.set_result(None)
            for running, _ in flushed:
                if running.flushing is done:
                    running.flushing = None
        for (job, _, _), held in zip(items, written, strict=True):
            if not held:
                self._abort(job.id)

    async def _record(self, write: Callable[[], Awaitable[Any]]) -> None:
        """Record how a job ended, retried while the store is briefly unavailable (the job stays
        in ``running``, so its lease keeps being renewed meanwhile). A write that still fails is
        logged: the lease lapses and the job is run again elsewhere."""
        await _quietly(_retrying(write, self.config.lease_seconds))

    async def _execute(self, running: RunningJob) -> None:
        job, token = running.job, running.lease_token
        logs.bind(**logs.job_fields(job))  # what this task logs names the job
        try:
            await self._attempt(running)
        except asyncio.CancelledError:
            if running.releasing and running.accepted is not None and not running.accepted.done():
                await asyncio.wait([running.accepted])  # released only once it is on disk
            if running.releasing and running.on_disk:
                await _quietly(self.queue.release(job, token, "worker stopped; job requeued"))
            elif not running.releasing and running.on_disk:
                await self._keep_cancelled_output(running)
                await self._forward_cancel(running)
        finally:
            if self.running.get(job.id) is running:  # else: it is already running again here
                self.queue.live.running.discard(job.id)
                self.queue.live.forget(job.id)
                del self.running[job.id]
            self._active[job.upstream] -= 1
            self._slot_freed()

    async def _keep_cancelled_output(self, running: RunningJob) -> None:
        """A job cancelled while it ran keeps what its attempt had produced: its output so far
        (the text, with what a flush had not written yet, and usage if the upstream had sent
        it). Its lease lost instead (taken over elsewhere), the write changes nothing."""
        so_far = running.output_so_far
        if so_far is None:  # the answer had not begun (or is not streamed): nothing to keep
            return
        try:
            output = so_far()
        except Exception as exc:  # (a half-streamed tool call that is not JSON yet)
            log.info("job %s: its output so far could not be assembled: %s", running.job.id, exc)
            return
        job = running.job
        await self._record(lambda: self.queue.keep_cancelled_output(job, output))

    async def _forward_cancel(self, running: RunningJob) -> None:
        """A job cancelled while its background response ran: the provider cancels it too.
        (Its lease lost instead, the response is left to the attempt that took the job over.)"""
        job, response_id = running.job, running.upstream_response
        background = self._background.get(job.upstream)
        if response_id is None or background is None:
            return
        try:
            current = await self.queue.get(job.tenant, job.id)
        except (NotFound, StoreError):
            return
        if current.status is not JobStatus.CANCELLED:
            return
        try:
            await background.cancel(response_id)
        except UpstreamError as exc:
            log.warning("job %s: cancelling background response %s failed: %s",
                        job.id, response_id, exc)  # fmt: skip

    async def _call(
        self, running: RunningJob, upstream: Upstream, body: dict[str, Any]
    ) -> dict[str, Any]:
        """One upstream call: a background response for a chat job of a background upstream,
        else the upstream's ``run``."""
        job = running.job
        background = self._background.get(job.upstream)
        if background is None or job.operation is not Operation.CHAT_COMPLETIONS:
            return await upstream.run(
                job.operation,
                body,
                running.add_delta,
                held_until=running.accepted,
                partial=running.track_output,
            )
        if not await _written(running):  # never accepted: nothing to create at the provider
            raise UpstreamError("job_lost", "the job was never accepted")
        token = running.lease_token
        poke = asyncio.Event()

        def follow(response_id: str) -> None:
            if running.upstream_response is not None:
                self._pokes.pop(running.upstream_response, None)
            running.upstream_response = response_id
            self._pokes[response_id] = poke

        async def record(response_id: str) -> bool:
            follow(response_id)
            held: list[bool] = []

            async def write() -> None:
                held.append(await self.queue.record_upstream_response(job, token, response_id))

            await _retrying(write, self.config.lease_seconds)
            return bool(held and held[-1])

        recorded = await self.queue.upstream_response_of(job)
        if recorded is not None:
            follow(recorded)
        try:
            output = await background.run(
                body,
                recorded=recorded,
                record=record,
                metadata={"hookline_job_id": job.id},
                poke=poke,
            )
        finally:
            if running.upstream_response is not None:
                self._pokes.pop(running.upstream_response, None)
        # The answer comes whole: its text is the job's output deltas too, so a stream that
        # watches the job (the facade's stream: true) shows it, in one piece.
        for choice in output.get("choices") or ():
            content = (
                (choice.get("message") or {}).get("content") if isinstance(choice, dict) else None
            )
            if isinstance(content, str) and content:
                running.add_delta(int(choice.get("index") or 0), content)
        return output

    async def _attempt(self, running: RunningJob) -> None:
        job, token = running.job, running.lease_token
        upstream = self.upstreams.get(job.upstream)
        if upstream is None:
            failure = UpstreamFailure("upstream_unknown", f"no upstream named {job.upstream!r}")
            await self._record(lambda: self.queue.fail(job, token, failure))
            return
        router = self.queue.router
        wait = router.admit(job.upstream)
        if wait is not None:  # its circuit is open: a route falls back, a lone upstream waits
            failure = UpstreamFailure(
                "circuit_open",
                f"upstream {job.upstream!r} failed repeatedly: its circuit is open for {wait:.1f} s",
                retryable=True,
                retry_after=wait,
            )
            await self._record(lambda: self.queue.fail(job, token, failure))
            return
        body = {**job.input, "model": router.model_for(job.model, job.upstream)}
        call = self.queue.telemetry.upstream_call(
            job, upstream.config.type, upstream.config.base_url, body
        )
        try:
            output = await self._call(running, upstream, body)
        except UpstreamError as exc:
            call.ended(str(exc.status or exc.type), running.first_output_at)
            if exc.retryable:  # (a refusal is an answer: the upstream is up)
                router.failed(job.upstream)
            else:
                router.succeeded(job.upstream)
            if not await _written(running):
                return
            deltas = running.take_deltas()
            failure = UpstreamFailure(
                exc.type, exc.message, exc.status, exc.retryable, exc.retry_after, exc.body
            )
            if deltas:
                await self._record(lambda: self.queue.add_output_deltas([(job, token, deltas)]))
            await self._record(lambda: self.queue.fail(job, token, failure))
            return
        except (asyncio.CancelledError, KeyboardInterrupt):
            call.ended("cancelled", running.first_output_at)
            raise
        except Exception as exc:
            call.ended("internal_error", running.first_output_at)
            if not await _written(running):
                return
            log.exception("job %s: unexpected error from upstream %s", job.id, job.upstream)
            failure = UpstreamFailure("internal_error", f"{type(exc).__name__}: {exc}", None, True)
            await self._record(lambda: self.queue.fail(job, token, failure))
            return
        call.ended("ok", running.first_output_at, output)
        router.succeeded(job.upstream)
        if not await _written(running):
            return
        # The last output and the success: one transaction, not two.
        deltas = running.take_deltas()
        await self._record(lambda: self.queue.succeed(job, token, output, deltas))


async def _retrying(write: Callable[[], Awaitable[Any]], for_seconds: float) -> None:
    """Run a store write, again and again while the store is unavailable (an outage, or a burst
    of writes waiting longer than the pool allows) for up to ``for_seconds``. A job's outcome is
    in memory only: losing its write means calling the upstream again once the lease lapses."""
    async for attempt in stamina.retry_context(
        on=StoreUnavailable,
        attempts=None,
        timeout=for_seconds,
        wait_initial=0.05,
        wait_max=2.0,
        wait_jitter=0.05,
    ):
        with attempt:
            await write()


async def _written(running: RunningJob) -> bool:
    """Wait until a job started during its accept is on disk; False if it never will be."""
    while running.flushing is not None:  # the job's earlier text goes on disk first
        await asyncio.shield(running.flushing)
    if running.accepted is None:
        return True
    try:
        return await asyncio.shield(running.accepted)
    except asyncio.CancelledError:
        if running.accepted.cancelled():
            return False
        raise


async def _quietly(awaitable: Any) -> None:
    """Run a store write whose failure must not kill the worker: the lease will lapse and the
    job be recovered, so logging is the right response."""
    try:
        await awaitable
    except StoreError as exc:
        log.warning("store write failed, the job will be recovered when its lease lapses: %s", exc)
