"""The webhook sender: works through the delivery outbox and POSTs each message, signed.

It claims due messages that head their (destination, job) queue, so one job's messages reach one
destination in order while other jobs and destinations go on; a claim is a lease, so no message is
sent by two processes at once and a crash mid-send means a resend after the lease runs out (at
least once; receivers dedupe on ``webhook-id``). Per destination it keeps at most
``max_in_flight_per_endpoint`` sends in flight and honours an endpoint's rate limit. Failures are
retried on ``retry_schedule_seconds`` (±20% jitter, never sooner than a 429/503's Retry-After); a
410 disables the endpoint; an endpoint failing without a success for ``disable_after_seconds`` is
disabled; a message whose schedule runs out is ``failed`` (a dead letter, replayable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import aiohttp
import orjson

from hookline.batching import WriteBatcher
from hookline.clock import Clock
from hookline.config import WebhooksConfig
from hookline.deliveries import AttemptOutcome, Delivery, Endpoint
from hookline.errors import StoreError
from hookline.httputil import parse_retry_after
from hookline.ids import new_id
from hookline.notify import DELIVERIES_AVAILABLE, Notifier
from hookline.ssrf import AddressPolicy, GuardedResolver, check_url_syntax
from hookline.store.webhook_sql import ClaimRequest, DeliveryStore, RecordedAttempt
from hookline.webhooks import headers_for

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
        if not future.done() or future.cancelled() or future.exception() is not None:
            return None
        return future.result()

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        entry = self._entries.get(key)
        if entry is not None and entry[0] >= time.monotonic():
            future = entry[1]
            if not future.done():
                return await asyncio.shield(future)  # a load in flight: share it
            if future.exception() is None:
                return future.result()  # the hot path: no new future at all
        if len(self._entries) > 10_000:
            self._entries.clear()
        future = asyncio.ensure_future(load())
        self._entries[key] = (time.monotonic() + self.seconds, future)
        return await asyncio.shield(future)


def destination(delivery: Delivery) -> str:
    return delivery.order_key.split("|", 1)[0]


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
    def __init__(
        self, store: DeliveryStore, config: WebhooksConfig, clock: Clock, notifier: Notifier
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.notifier = notifier
        self.policy = AddressPolicy(config)
        self._in_flight: Counter[str] = Counter()
        self._buckets: dict[str, TokenBucket] = {}
        self._rates: dict[str, float | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_freed: set[str] = set()  # recorded sends whose in-flight count was given back
        self._stopping = False
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._unsubscribe: Callable[[], None] = lambda: None
        # Attempts finishing together are recorded in one transaction, which also claims the
        # messages to send next in the room they leave.
        self._results: WriteBatcher[RecordedAttempt, bool] = WriteBatcher(
            self._record_and_refill, name="hookline-webhook-results"
        )
        self._claim_batch = max(1, min(32, config.max_in_flight // 2))
        self._checked_urls: set[str] = set()  # URLs whose scheme and literal address passed
        self._secrets = LoadingCache[tuple[str, str | None], list[str]](_CACHE_SECONDS)
        self._endpoints = LoadingCache[tuple[str, str], Endpoint | None](_CACHE_SECONDS)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=GuardedResolver(self.policy), limit=0),
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds),
        )
        self._unsubscribe = self.notifier.subscribe(
            DELIVERIES_AVAILABLE, lambda _: self._wake.set()
        )
        self._loop_task = asyncio.create_task(self._run(), name="hookline-webhooks")

    async def stop(self) -> None:
        self._stopping = True
        self._unsubscribe()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        # Sends in flight finish (bounded by the timeout); the rest keep their lease.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.config.timeout_seconds)
        await self._results.stop()
        if self._session is not None:
            await self._session.close()

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                claimed = await self._claim()
            except StoreError as exc:
                log.warning("claiming webhook messages failed: %s", exc)
                claimed = 0
            if claimed == 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.poll_seconds):
                        await self._wake.wait()

    def _saturated(self, finishing: Counter[str] | None = None) -> set[str]:
        """Destinations at their concurrency or rate limit (not counting ``finishing`` sends)."""
        limit = self.config.max_in_flight_per_endpoint
        finishing = finishing or Counter()
        busy = {d for d, n in self._in_flight.items() if n - finishing[d] >= limit}
        busy |= {d for d, bucket in self._buckets.items() if not bucket.available()}
        return busy

    def _claim_request(self, room: int, finishing: Counter[str] | None = None) -> ClaimRequest:
        now = self.clock.now_ms()
        lease_ms = int((self.config.timeout_seconds * 2 + 1) * 1000)  # a send outlives no lease
        return ClaimRequest(
            now, min(room, 100), new_id("lease"), now + lease_ms, self._saturated(finishing)
        )

    async def _claim(self) -> int:
        room = self.config.max_in_flight - len(self._tasks)
        # A claim is a write transaction: wait for a worthwhile batch of free room rather than
        # claiming one message each time one finishes.
        if room <= 0 or (self._tasks and room < self._claim_batch):
            return 0
        claim = self._claim_request(room)
        batch = await self.store.claim_due(
            claim.now, claim.limit, claim.lease_token, claim.lease_expires_at, claim.busy
        )
        return await self._dispatch(batch, claim.lease_token)

    async def _record_and_refill(self, results: list[RecordedAttempt]) -> list[bool]:
        # The sends being recorded are still counted in flight; their room is free once this ends.
        room = self.config.max_in_flight - len(self._tasks) + len(results)
        claim = None
        if room >= self._claim_batch and not self._stopping:
            finishing = Counter(destination(delivery) for delivery, *_ in results)
            claim = self._claim_request(room, finishing)
        try:
            held, batch = await self.store.record_attempts(results, claim)
        finally:
            for delivery, *_ in results:  # their slots are free for the new claims
                self._in_flight[destination(delivery)] -= 1
                self._slot_freed.add(delivery.id)
        if claim is not None:
            await self._dispatch(batch, claim.lease_token)
        return held

    async def _dispatch(self, batch: list[Delivery], token: str) -> int:
        """Start sending claimed messages; any over a destination's limit go back."""
        taken: Counter[str] = Counter()
        limit = self.config.max_in_flight_per_endpoint
        sendable: list[Delivery] = []
        extra: list[Delivery] = []
        for delivery in batch:
            dest = destination(delivery)
            fits = self._in_flight[dest] + taken[dest] < limit
            (sendable if fits else extra).append(delivery)
            taken[dest] += fits
        if extra:
            await self.store.release([d.id for d in extra], token)
        for delivery in sendable:
            self._in_flight[destination(delivery)] += 1  # counted now: the next claim sees it
            task = asyncio.create_task(self._send(delivery))
            self._tasks.add(task)
            task.add_done_callback(self._sent)
        return len(sendable)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if len(self._tasks) <= self.config.max_in_flight - self._claim_batch:
            self._wake.set()

    async def _send(self, delivery: Delivery) -> None:
        dest = destination(delivery)
        try:
            if delivery.endpoint_id is not None:  # per-job URLs have no rate limit
                await self._rate_limit(delivery, dest)
            outcome = await self._post(delivery)
            now = self.clock.now_ms()
            if not outcome.succeeded and delivery.endpoint_id is not None:
                outcome = await self._maybe_break_circuit(delivery, outcome, now)
            assert delivery.lease_token is not None
            await self._results.submit((delivery, delivery.lease_token, outcome, now))
            if outcome.disable_endpoint:
                log.warning(
                    "endpoint %s disabled: %s", delivery.endpoint_id, outcome.disable_endpoint
                )
        except StoreError as exc:
            log.warning("recording delivery %s failed (it will be resent): %s", delivery.id, exc)
        finally:
            if delivery.id in self._slot_freed:
                self._slot_freed.discard(delivery.id)
            else:
                self._in_flight[dest] -= 1

    async def _rate_limit(self, delivery: Delivery, dest: str) -> None:
        if delivery.endpoint_id is None:
            return
        tenant, endpoint_id = delivery.tenant, delivery.endpoint_id
        endpoint = await self._endpoints.get(
            (tenant, endpoint_id), lambda: self.store.get_endpoint(tenant, endpoint_id)
        )
        rate = endpoint.rate_limit_per_second if endpoint else None
        if rate is None:
            self._buckets.pop(dest, None)
            return
        bucket = self._buckets.get(dest)
        if bucket is None or bucket.rate != rate:
            bucket = self._buckets[dest] = TokenBucket(rate)
        while not bucket.available():  # noqa: ASYNC110 (tokens refill with time, no event)
            await asyncio.sleep(1.0 / rate)
        bucket.take()

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
        if error is None:
            return AttemptOutcome(status, latency_ms, None, excerpt, True, None)
        if status == 410:
            reason = "the receiver answered 410 Gone"
            return AttemptOutcome(status, latency_ms, error, excerpt, False, None,
                                  disable_endpoint=reason if delivery.endpoint_id else None)  # fmt: skip
        next_at = self._next_attempt(delivery.attempts + 1, status, retry_after)
        return AttemptOutcome(status, latency_ms, error, excerpt, False, next_at)

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
        return AttemptOutcome(
            outcome.status_code, outcome.latency_ms, outcome.error, outcome.response_excerpt,
            False, outcome.next_attempt_at, disable_endpoint=reason,
        )  # fmt: skip
