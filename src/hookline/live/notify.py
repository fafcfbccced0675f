"""In-process wake-ups by topic, so waiters react at once instead of polling.

Topics used: ``jobs.available`` (a job became runnable: wakes the worker's claim loop),
``job:<id>`` (the job changed: wakes long-polls), ``job.cancelled`` (payload: the job id; the
worker aborts the upstream call), ``upstream.response`` (payload: a provider's background response id: its
worker looks at it at once), ``tenant.accepted`` (payload: the tenant; nudges its event
streams) and ``keys.revoked`` (every process drops its cached API keys). On PostgreSQL, :mod:`hookline.live.broadcast` carries
publishes between processes (LISTEN/NOTIFY); processes that share a SQLite file fall back to
polling at ``worker.poll_seconds``, and the waits here always take a timeout for that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable

Listener = Callable[[str], None]

# Webhook messages were written to the outbox: wakes the sender.
DELIVERIES_AVAILABLE = "deliveries.available"
# A job became runnable: wakes the workers' claim loops.
JOBS_AVAILABLE = "jobs.available"
# A job was cancelled (payload: its id): the worker running it aborts the upstream call.
JOB_CANCELLED = "job.cancelled"
# A job of the tenant (the payload) was accepted: its events are not published to the live hub
# (the accept's insert returns no event ids), so the tenant's streams are nudged to read them.
TENANT_ACCEPTED = "tenant.accepted"
# An API key was revoked: every process forgets the keys it cached (hookline.auth).
KEYS_REVOKED = "keys.revoked"
# A provider's webhook says a background response changed (payload: the provider's response
# id): the worker following it looks at once (hookline.worker).
UPSTREAM_RESPONSE = "upstream.response"


def job_topic(job_id: str) -> str:
    """The topic of one job's changes (wakes its long-polls)."""
    return f"job:{job_id}"


class Notifier:
    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._listeners: defaultdict[str, list[Listener]] = defaultdict(list)
        # Called with each topic published here (not with those received from elsewhere): on
        # PostgreSQL, the broadcast to the other processes (hookline.live.broadcast).
        self.forward: Callable[[str, str], None] | None = None

    def publish(self, topic: str, payload: str = "", *, remote: bool = False) -> None:
        """Wake every waiter on ``topic`` and call its listeners with ``payload``. ``remote``:
        the publish came from another process, so it is not sent on again."""
        if self.forward is not None and not remote:
            self.forward(topic, payload)
        event = self._events.pop(topic, None)
        if event is not None:
            event.set()
        for listener in list(self._listeners.get(topic, ())):
            listener(payload)

    async def wait(self, topic: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``topic``; True if it was published meanwhile."""
        event = self._events.get(topic)
        if event is None:
            event = self._events[topic] = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
            return True
        except TimeoutError:
            return False

    def subscribe(self, topic: str, listener: Listener) -> Callable[[], None]:
        """Call ``listener(payload)`` on each publish of ``topic``; returns the unsubscribe call."""
        self._listeners[topic].append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners[topic].remove(listener)

        return unsubscribe
