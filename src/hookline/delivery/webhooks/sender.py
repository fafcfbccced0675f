"""The webhook sender: works through the delivery outbox and POSTs each message, signed.

It claims due messages that head their (destination, job) queue, so one job's messages reach one
destination in order while other jobs and destinations go on; a claim is a lease, so no message is
sent by two processes at once and a crash mid-send means a resend after the lease runs out (at
least once; receivers dedupe on ``webhook-id``). Per destination it keeps at most
``max_in_flight_per_endpoint`` sends in flight and honours an endpoint's rate limit. Failures are
retried on ``retry_schedule_seconds`` (±20% jitter, never sooner than a 429/503's Retry-After); a
410 disables the endpoint; an endpoint failing without a success for ``disable_after_seconds`` is
disabled; a message whose schedule runs out is ``failed`` (a dead letter, replayable).

A message whose row names a data sink goes through the same claim, ready set, in-flight limits,
retries and recording: only its send differs (:meth:`WebhookSender._publish` hands it to
:class:`~hookline.delivery.sinks.Sinks`), and a sink whose circuit breaker is open is claimed for
no more until it closes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Generic, TypeVar

import aiohttp
import orjson

from hookline.clock import Clock
from hookline.config import WebhooksConfig
from hookline.deliveries import AttemptOutcome, Delivery, Endpoint
from hookline.delivery.sinks import Sinks, sink_message
from hookline.delivery.webhooks.signing import headers_for
from hookline.delivery.webhooks.ssrf import AddressPolicy, GuardedResolver, check_url_syntax
from hookline.errors import StoreError
from hookline.httputil import parse_retry_after
from hookline.ids import new_id
from hookline.live.notify import DELIVERIES_AVAILABLE, Notifier
from hookline.observability import Telemetry
from hookline.store.base_deliveries import ClaimRequest, Deliveries, RecordedAttempt
from hookline.store.group_commit import WriteBatcher

log = logging.getLogger("hookline.webhooks")
_EXCERPT_BYTES = 1024
# Secrets and endpoint settings are re-read at most this often: a rotation or a new rate limit
# applies within a second (a rotated-out secret stays valid for its overlap anyway).
_CACHE_SECONDS = 1.0

K = TypeVar("K")
V = TypeVar("V")


class LoadingCache(Generic[K, V]):
    """Values kept for ``seconds``; concurrent misses of one key share a single load, so 64 sends
    starting together cost one query, not 64."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._entries: dict[K, tuple[float, asyncio.Future[V]]] = {}

    def peek(self, key: K) -> V | None:
        """The fresh loaded value, without a coroutine (the hot path); None if there is none."""
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        future = entry[1]
        return future.result() if future.done() and _loaded(future) else None

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        entry = self._entries.get(key)
        if entry is not None and entry[0] >= time.monotonic():
            future = entry[1]
            if not future.done():
                return await asyncio.shield(future)  # a load in flight: share it
            if _loaded(future):
                return future.result()  # the hot path: no new future at all
        if len(self._entries) > 10_000:
            self._entries.clear()
        future = asyncio.ensure_future(load())
        self._entries[key] = (time.monotonic() + self.seconds, future)
        return await asyncio.shield(future)


def _loaded(load: asyncio.Future[V]) -> bool:
    """Whether a finished load gave a value: it may have failed instead, or been cancelled (asked
    for its exception then, it would raise CancelledError in the caller)."""
    return not load.cancelled() and load.exception() is None


def destination(delivery: Delivery) -> str:
    return delivery.order_key.split("|", 1)[0]


def _by_lease(batch: list[Delivery]) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = {}
    for delivery in batch:
        assert delivery.lease_token is not None
        ids.setdefault(delivery.lease_token, []).append(delivery.id)
    return ids


def _log_recording(delivery: Delivery, recorded: asyncio.Future[bool]) -> None:
    if recorded.cancelled():
        return
    if (exc := recorded.exception()) is not None:
        log.warning("recording delivery %s failed (it will be resent): %s", delivery.id, exc)


class TokenBucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = max(1.0, rate)
        self.updated = time.monotonic()

    def available(self) -> bool:
        now = time.monotonic()
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return self.tokens >= 1.0

    def take(self) -> None:
        self.tokens -= 1.0


class WebhookSender:
    """Claimed messages wait in a small ready set, per destination; send loops take the next one
    the moment a POST ends (no task or transaction between two sends); finished attempts are
    recorded in batches off the send path, and the transaction that records them claims the next
    messages. So up to ``max_in_flight`` POSTs stay in flight under load, like a bare POST loop."""

    def __init__(
        self,
        store: Deliveries,
        config: WebhooksConfig,
        clock: Clock,
        notifier: Notifier,
        telemetry: Telemetry | None = None,
        policy: AddressPolicy | None = None,  # the gateway's (default: from config alone)
        sinks: Sinks | None = None,  # the configured data sinks, if any
    ) -> None:
        self.sinks = sinks
        self.store = store
        self.telemetry = telemetry or Telemetry()
        self.config = config
        self.clock = clock
        self.notifier = notifier
        self.policy = policy or AddressPolicy(config)
        self._ready: dict[str, collections.deque[Delivery]] = {}  # by destination, claimed
        self._ready_count = 0
        self._posting: Counter[str] = Counter()  # POSTs in progress, by destination
        self._recording = 0  # sent, the outcome not yet committed (the lease is still ours)
        # Room promised to claims in flight: a claim and a recording's claim running at once
        # would otherwise both claim the same room, and the surplus went back to the store.
        self._claiming = 0
        self._buckets: dict[str, TokenBucket] = {}
        self._senders: set[asyncio.Task[None]] = set()
        self._rate_timer: asyncio.TimerHandle | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._unsubscribe: Callable[[], None] = lambda: None
        # Claimed messages beyond what is in flight: the next POST starts without waiting for a
        # claim. At most this many messages are leased by this process at a time.
        self._capacity = 2 * config.max_in_flight
        # Claims and recordings cost much less per message in big batches (SQLite writes each
        # touched page once per transaction): under load, a batch is about what is in flight.
        self._claim_batch = max(1, min(100, config.max_in_flight))
        self._results: WriteBatcher[RecordedAttempt, bool] = WriteBatcher(
            self._record_and_refill,
            name="hookline-webhook-results",
            worth_waiting=lambda queued: queued < self._claim_batch and bool(self._posting),
            # Where writes run side by side (PostgreSQL), a recording waits on round trips to the
            # server, so two run at once (+12-15% messages/s measured; the claims in them skip
            # each other's rows). SQLite writes one transaction at a time anyway.
            writers=2 if store.capabilities.concurrent_writers else 1,
        )
        self._checked_urls: set[str] = set()  # URLs whose scheme and literal address passed
        self._secrets = LoadingCache[tuple[str, str | None], list[str]](_CACHE_SECONDS)
        self._endpoints = LoadingCache[tuple[str, str], Endpoint | None](_CACHE_SECONDS)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=GuardedResolver(self.policy), limit=0),
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds),
            cookie_jar=aiohttp.DummyCookieJar(),  # a receiver's cookies mean nothing here
        )
        self._unsubscribe = self.notifier.subscribe(
            DELIVERIES_AVAILABLE, lambda _: self._wake.set()
        )
        self._loop_task = asyncio.create_task(self._run(), name="hookline-webhooks")

    async def stop(self) -> None:
        self._stopping = True
        self._unsubscribe()
        if self._rate_timer is not None:
            self._rate_timer.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        # Sends in flight finish (bounded by the timeout); claimed messages not yet sent go back.
        if self._senders:
            await asyncio.wait(self._senders, timeout=self.config.timeout_seconds)
        await self._results.stop()
        unsent = [d for queue in self._ready.values() for d in queue]
        self._ready.clear()
        self._ready_count = 0
        for token, ids in _by_lease(unsent).items():
            with contextlib.suppress(StoreError):
                await self.store.release(ids, token)
        if self._session is not None:
            await self._session.close()
        if self.sinks is not None:
            await self.sinks.close()

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            # Send loops are started where messages become ready; this catches any start missed
            # (it costs nothing when every ready message already has a loop).
            self._start_senders()
            claimed, asked = 0, 0
            if self._room() >= self._claim_batch or self._idle():
                try:
                    claimed, asked = await self._claim()
                except StoreError as exc:
                    log.warning("claiming webhook messages failed: %s", exc)
            if claimed == 0 or claimed < asked:  # nothing more is due now: wait to be told
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.poll_seconds):
                        await self._wake.wait()

    # --- what this process holds

    def _room(self, finishing: int = 0) -> int:
        held = sum(self._posting.values()) + self._ready_count + self._recording - finishing
        return self._capacity - held - self._claiming

    def _idle(self) -> bool:
        return self._ready_count == 0 and not self._posting and self._recording == 0

    def _busy(self) -> set[str]:
        """Destinations not to claim for: at their concurrency limit or out of rate tokens."""
        limit = self.config.max_in_flight_per_endpoint
        busy = {d for d, queue in self._ready.items() if len(queue) + self._posting[d] >= limit}
        busy |= {d for d, n in self._posting.items() if n >= limit}
        busy |= {d for d, bucket in self._buckets.items() if not bucket.available()}
        if self.sinks is not None:
            busy |= self.sinks.paused()
        return busy

    def _claim_request(self, room: int) -> ClaimRequest:
        now = self.clock.now_ms()
        lease_ms = int((self.config.timeout_seconds * 2 + 1) * 1000)  # a send outlives no lease
        return ClaimRequest(now, min(room, 100), new_id("lease"), now + lease_ms, self._busy())

    async def _claim(self) -> tuple[int, int]:
        """Claim due messages into the ready set: (how many came, how many were asked for)."""
        claim = self._claim_request(self._room())
        with self._promised(claim.limit):
            batch = await self.store.claim_due(
                claim.now, claim.limit, claim.lease_token, claim.lease_expires_at, claim.busy
            )
            await self._learn_rates(batch)
        await self._make_ready(batch)
        return len(batch), claim.limit

    async def _record_and_refill(self, results: list[RecordedAttempt]) -> list[bool]:
        # The room the recorded sends leave is claimed for in the same transaction.
        room = self._room(finishing=len(results))
        claim = None
        if not self._stopping and (room >= self._claim_batch or room == self._capacity):
            claim = self._claim_request(room)
        try:
            with self._promised(claim.limit if claim is not None else 0):
                held, batch = await self.store.record_attempts(results, claim)
                await self._learn_rates(batch)
        finally:
            self._recording -= len(results)
        if claim is not None:
            await self._make_ready(batch)
        if self._room() >= self._claim_batch:
            self._wake.set()
        return held

    @contextlib.contextmanager
    def _promised(self, room: int) -> Iterator[None]:
        """``room`` promised to a claim until its messages are in the ready set (or it failed)."""
        self._claiming += room
        try:
            yield
        finally:
            self._claiming -= room

    async def _learn_rates(self, batch: list[Delivery]) -> None:
        """The rate limits of the claimed messages' endpoints (cached; may read the store)."""
        for delivery in batch:
            if delivery.endpoint_id is not None:
                await self._learn_rate(delivery, destination(delivery))

    async def _make_ready(self, batch: list[Delivery]) -> None:
        """Queue claimed messages by destination (their rates learnt already: nothing before the
        release below waits) and start send loops for them; a destination's messages beyond
        twice its limit go back."""
        keep_limit = 2 * self.config.max_in_flight_per_endpoint
        extra: list[Delivery] = []
        for delivery in batch:
            dest = destination(delivery)
            queue = self._ready.get(dest)
            if queue is None:
                queue = self._ready[dest] = collections.deque()
            if len(queue) + self._posting[dest] >= keep_limit:
                extra.append(delivery)
            else:
                queue.append(delivery)
                self._ready_count += 1
            if not queue:
                del self._ready[dest]
        for token, ids in _by_lease(extra).items():
            await self.store.release(ids, token)
        self._start_senders()

    async def _learn_rate(self, delivery: Delivery, dest: str) -> None:
        assert delivery.endpoint_id is not None
        tenant, endpoint_id = delivery.tenant, delivery.endpoint_id
        endpoint = self._endpoints.peek((tenant, endpoint_id)) or await self._endpoints.get(
            (tenant, endpoint_id), lambda: self.store.get_endpoint(tenant, endpoint_id)
        )
        rate = endpoint.rate_limit_per_second if endpoint else None
        if rate is None:
            self._buckets.pop(dest, None)
        elif (bucket := self._buckets.get(dest)) is None or bucket.rate != rate:
            self._buckets[dest] = TokenBucket(rate)

    # --- sending

    def _start_senders(self) -> None:
        while len(self._senders) < self.config.max_in_flight:
            delivery = self._take_ready()
            if delivery is None:
                return
            task = asyncio.create_task(self._send_loop(delivery))
            self._senders.add(task)
            task.add_done_callback(self._senders.discard)

    def _take_ready(self) -> Delivery | None:
        """The next message whose destination has room and a rate token (round robin)."""
        if self._stopping or not self._ready_count:
            return None
        limit = self.config.max_in_flight_per_endpoint
        rate_limited = False
        # A message whose lease could run out before its POST and its recording is skipped:
        # another claim takes it once the lease lapses.
        fresh_until = self.clock.now_ms() + int((self.config.timeout_seconds + 1) * 1000)
        chosen: tuple[str, Delivery] | None = None
        emptied: list[str] = []  # destinations whose every message was stale
        for dest, queue in self._ready.items():
            if self._posting[dest] >= limit:
                continue
            bucket = self._buckets.get(dest)
            if bucket is not None and not bucket.available():
                rate_limited = True
                continue
            while queue:
                delivery = queue.popleft()
                self._ready_count -= 1
                if (delivery.lease_expires_at or 0) >= fresh_until:
                    chosen = dest, delivery
                    break
            if chosen is not None:
                break
            emptied.append(dest)
        for dest in emptied:  # (not while iterating)
            del self._ready[dest]
        if chosen is not None:
            dest, delivery = chosen
            queue = self._ready.pop(dest)
            if queue:  # the destination goes to the back of the line
                self._ready[dest] = queue
            bucket = self._buckets.get(dest)
            if bucket is not None:
                bucket.take()
            self._posting[dest] += 1
            return delivery
        if rate_limited and self._rate_timer is None:
            self._rate_timer = asyncio.get_running_loop().call_later(
                self._next_token_in(), self._rate_tick
            )
        return None

    def _next_token_in(self) -> float:
        return min((1.0 / b.rate for b in self._buckets.values() if b.rate > 0), default=0.05)

    def _rate_tick(self) -> None:
        self._rate_timer = None
        self._start_senders()

    async def _send_loop(self, first: Delivery) -> None:
        delivery: Delivery | None = first
        try:
            while delivery is not None:
                await self._send(delivery)
                delivery = self._take_ready()
        finally:
            # Leave the set in the same step that found nothing ready: a done callback would
            # run a step later, and messages made ready in between found every loop "running"
            # and got none (a batch of sink publishes acknowledged together stalled that way).
            self._senders.discard(asyncio.current_task())
        if self._room() >= self._claim_batch:
            self._wake.set()

    async def _send(self, delivery: Delivery) -> None:
        dest = destination(delivery)
        try:
            if delivery.sink is None:
                outcome = await self._post(delivery)
            else:
                outcome = await self._publish(delivery, delivery.sink)
            now = self.clock.now_ms()
            if not outcome.succeeded and delivery.endpoint_id is not None:
                outcome = await self._maybe_break_circuit(delivery, outcome, now)
        except StoreError as exc:
            log.warning("checking endpoint health failed (%s will be resent): %s", delivery.id, exc)
            return
        finally:
            self._posting[dest] -= 1
            if self._posting[dest] <= 0:
                del self._posting[dest]
        assert delivery.lease_token is not None
        kind = "webhook" if delivery.sink is None else self._sink_kind(delivery.sink)
        self.telemetry.delivery_attempt(kind, delivery, outcome, now)
        self._recording += 1
        recorded = self._results.put((delivery, delivery.lease_token, outcome, now))
        recorded.add_done_callback(functools.partial(_log_recording, delivery))
        if outcome.disable_endpoint:
            log.warning("endpoint %s disabled: %s", delivery.endpoint_id, outcome.disable_endpoint,
                        extra={"endpoint_id": delivery.endpoint_id, "tenant": delivery.tenant})  # fmt: skip

    async def _post(self, delivery: Delivery) -> AttemptOutcome:
        assert self._session is not None
        body = orjson.dumps(delivery.payload)
        tenant, endpoint_id = delivery.tenant, delivery.endpoint_id
        secrets = self._secrets.peek((tenant, endpoint_id)) or await self._secrets.get(
            (tenant, endpoint_id),
            lambda: self.store.signing_secrets(tenant, endpoint_id, self.clock.now_ms()),
        )
        # The signature's timestamp is wall-clock time: receivers check it against theirs.
        headers = headers_for(delivery.id, int(time.time()), body, secrets)
        span = self.telemetry.tracing.delivery_started(delivery.traceparent, delivery.url, headers)
        started = time.monotonic()
        status: int | None = None
        excerpt: str | None = None
        retry_after: float | None = None
        try:
            if delivery.url not in self._checked_urls:
                check_url_syntax(delivery.url, self.policy)
                if len(self._checked_urls) > 10_000:
                    self._checked_urls.clear()
                self._checked_urls.add(delivery.url)
            async with self._session.post(
                delivery.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                excerpt = (await response.content.read(_EXCERPT_BYTES)).decode(errors="replace")
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            error = None if 200 <= status < 300 else f"receiver answered HTTP {status}"
        except TimeoutError:
            error = f"no answer within {self.config.timeout_seconds:g} s"
        except aiohttp.ClientConnectorError as exc:  # its text hides the cause (an SSRF refusal)
            error = f"cannot connect to {exc.host}:{exc.port}: {exc.os_error}"[:1024]
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:1024]
        except Exception as exc:  # an invalid URL and the like: a failed attempt, not a crash
            error = f"{type(exc).__name__}: {exc}"[:1024]
        latency_ms = int((time.monotonic() - started) * 1000)
        self.telemetry.tracing.delivery_ended(span, status, error)
        if error is None:
            return AttemptOutcome(
                status_code=status, latency_ms=latency_ms, response_excerpt=excerpt, succeeded=True
            )
        if status == 410:
            reason = "the receiver answered 410 Gone"
            return AttemptOutcome(
                status_code=status, latency_ms=latency_ms, error=error, response_excerpt=excerpt,
                disable_endpoint=reason if delivery.endpoint_id else None,
            )  # fmt: skip
        next_at = self._next_attempt(delivery.attempts + 1, status, retry_after)
        return AttemptOutcome(
            status_code=status, latency_ms=latency_ms, error=error, response_excerpt=excerpt,
            next_attempt_at=next_at,
        )  # fmt: skip

    def _sink_kind(self, sink: str) -> str:
        return self.sinks.kind(sink) if self.sinks is not None else "sink"

    async def _publish(self, delivery: Delivery, sink: str) -> AttemptOutcome:
        """Hand the message to its data sink, signed as a webhook with the tenant's secret (so one
        consumer verifies both); retried on the webhooks' schedule like a failed POST."""
        tenant = delivery.tenant
        secrets = self._secrets.peek((tenant, None)) or await self._secrets.get(
            (tenant, None), lambda: self.store.signing_secrets(tenant, None, self.clock.now_ms())
        )
        started = time.monotonic()
        if self.sinks is None:
            error: str | None = f"no sink {sink!r} is configured in this process"
        else:
            config = self.sinks.configs.get(sink)
            if config is None:
                error = f"no sink {sink!r} is configured in this process"
            else:
                body = orjson.dumps(delivery.payload)
                signed = headers_for(delivery.id, int(time.time()), body, secrets)
                tracing = self.telemetry.tracing  # (its span's traceparent joins the headers)
                span = tracing.delivery_started(delivery.traceparent, config.url, signed, sink)
                message = sink_message(
                    config, delivery.id, tenant, delivery.job_id, delivery.payload, signed
                )
                error = await self.sinks.publish(sink, message)
                tracing.delivery_ended(span, None, error)
        latency_ms = int((time.monotonic() - started) * 1000)
        if error is None:
            return AttemptOutcome(status_code=None, latency_ms=latency_ms, succeeded=True)
        next_at = self._next_attempt(delivery.attempts + 1, None, None)
        return AttemptOutcome(
            status_code=None, latency_ms=latency_ms, error=error, next_attempt_at=next_at
        )

    def _next_attempt(
        self, attempts: int, status: int | None, retry_after: float | None
    ) -> int | None:
        schedule = self.config.retry_schedule_seconds
        if attempts > len(schedule):
            return None  # dead letter
        wait = schedule[attempts - 1] * random.uniform(0.8, 1.2)
        if status in (429, 503) and retry_after is not None:
            wait = max(wait, retry_after)
        return self.clock.now_ms() + int(wait * 1000)

    async def _maybe_break_circuit(
        self, delivery: Delivery, outcome: AttemptOutcome, now: int
    ) -> AttemptOutcome:
        assert delivery.endpoint_id is not None
        since = await self.store.failing_since(delivery.endpoint_id)
        window_ms = int(self.config.disable_after_seconds * 1000)
        if since is None or now - since < window_ms or outcome.disable_endpoint:
            return outcome
        reason = f"failing without a success for {self.config.disable_after_seconds / 86400:g} days"
        return dataclasses.replace(outcome, succeeded=False, disable_endpoint=reason)
