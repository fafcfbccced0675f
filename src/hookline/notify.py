"""In-process wake-ups by topic, so waiters react at once instead of polling.

Topics used: ``jobs.available`` (a job became runnable: wakes the worker's claim loop),
``job:<id>`` (the job changed: wakes long-polls) and ``job.cancelled`` (payload: the job id; the
worker aborts the upstream call). On PostgreSQL, :mod:`hookline.broadcast` carries
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


class Notifier:
    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._listeners: defaultdict[str, list[Listener]] = defaultdict(list)
        # Called with each topic published here (not with those received from elsewhere): on
        # PostgreSQL, the broadcast to the other processes (hookline.broadcast).
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
