"""The sender under acknowledgements that come in bursts, as a JetStream server sends them: every
send in flight ends in the same step of the event loop. No service is needed: the sink here is a
scripted peer that holds each publish until 100 are waiting, then confirms them all at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa

from hookline.clock import SystemClock
from hookline.config import SinkConfig, WebhooksConfig
from hookline.deliveries import SinkRoute, SinkRoutes
from hookline.delivery.sinks import Sink, SinkMessage, Sinks
from hookline.delivery.webhooks.sender import WebhookSender
from hookline.events import Event, EventType
from hookline.live.notify import Notifier
from hookline.store import open_store
from hookline.store.migrate import upgrade
from hookline.store.outbox import enqueue_deliveries
from hookline.store.schema import deliveries

IN_FLIGHT = 100  # the most one claim takes: a burst empties the ready set


class BurstSink(Sink):
    """Confirms publishes only in bursts of ``IN_FLIGHT`` (or the last few after a short wait)."""

    def __init__(self, config: SinkConfig) -> None:
        super().__init__(config)
        self.waiting: list[asyncio.Future[None]] = []
        self.published: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def publish(self, message: SinkMessage) -> None:
        confirmed = asyncio.get_running_loop().create_future()
        self.waiting.append(confirmed)
        if len(self.waiting) >= IN_FLIGHT:
            self._confirm_all()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(0.05, self._confirm_all)
        await confirmed
        self.published.add(message.id)

    def _confirm_all(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self.waiting = self.waiting, []
        for confirmed in waiting:
            confirmed.set_result(None)

    async def close(self) -> None:
        pass


async def test_a_burst_of_confirmations_never_leaves_ready_messages_without_a_sender(
    tmp_path: Path,
) -> None:
    """All 100 sends end together; recording their outcomes (inline on an idle SQLite) claims the
    next messages before those send loops have left the sender's set. Those messages got no send
    loop, and with nothing in flight nothing started one: 1,000 messages stalled after the first
    few hundred. Here the sender's periodic poll is an hour, so it cannot hide a lost start."""
    messages = 1000
    config = SinkConfig(name="burst", type="jsonl", url=tmp_path.as_uri(), target="unused.jsonl")
    sinks = Sinks([config])
    sink = BurstSink(config)
    sinks._sinks["burst"] = sink  # the scripted peer in place of the file
    store = await open_store(f"sqlite:///{tmp_path / 'outbox.db'}")
    await upgrade(store.database)
    now = SystemClock().now_ms()
    events = [(Event(0, f"job_{i:05d}", "t", 1, EventType.SUCCEEDED, {}, now), None, None)
              for i in range(messages)]  # fmt: skip
    routes = SinkRoutes([SinkRoute("burst", ("*",), ("*",), True)])
    await store.database.write(lambda conn: enqueue_deliveries(conn, events, now, sinks=routes))
    webhooks = WebhooksConfig(
        max_in_flight=IN_FLIGHT, max_in_flight_per_endpoint=IN_FLIGHT, poll_seconds=3600
    )
    sender = WebhookSender(store.webhooks, webhooks, SystemClock(), Notifier(), sinks=sinks)
    count = sa.select(deliveries.c.status, sa.func.count()).group_by(deliveries.c.status)

    async def statuses() -> dict[str, int]:
        rows = await store.database.read(lambda conn: conn.execute(count).all())
        return {str(status): int(n) for status, n in rows}

    await sender.start()
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while (seen := await statuses()).get("succeeded", 0) < messages:
            assert asyncio.get_running_loop().time() < deadline, (
                f"stalled: {seen}, {len(sink.published)} published"
            )
            await asyncio.sleep(0.1)
    finally:
        await sender.stop()
        await store.close()
    assert seen == {"succeeded": messages}
    assert len(sink.published) == messages
