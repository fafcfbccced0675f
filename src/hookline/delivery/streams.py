"""A job's events as a resumable stream: history from the store, then live messages.

:func:`job_stream` is what SSE, the WebSocket and the OpenAI facade read. It first replays the
durable events after the caller's resume point, then relays the :class:`~hookline.live.LiveHub`
messages of this process: committed events, and output text the moment the upstream produced it.
A :class:`~hookline.live.StreamCursor` keeps the two consistent (no text lost or doubled). Events
written by other processes are found by re-reading the store: at once when a live event shows a
gap in ``seq``, and otherwise every ``poll_seconds``. The stream ends after the terminal event.

:func:`tenant_stream` follows every durable event of a tenant, by store-wide event id, reading
the store when a committed event (or an accept) says there is news, not on a timer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from typing import Any

from hookline.events import Event, EventType, event_json
from hookline.jobs import Job, iso
from hookline.live.hub import LiveDelta, Message, StreamCursor, Subscription
from hookline.live.notify import TENANT_ACCEPTED
from hookline.queue import JobQueue

_PAGE = 1000
# A tenant stream woken by an event reads the store no sooner than this after its last read.
_READ_GAP = 0.05
_FIRST_RESYNC = 1.0  # an idle tenant stream's first safety re-read; then doubling


@dataclasses.dataclass(frozen=True, slots=True)
class StreamItem:
    """One message of a stream: ``id`` is the resume token (the SSE id)."""

    id: str
    message: Event | LiveDelta

    @property
    def type(self) -> str:
        return self.message.type.value if isinstance(self.message, Event) else DELTA

    @property
    def terminal(self) -> bool:
        return isinstance(self.message, Event) and self.message.type.is_terminal

    @property
    def body(self) -> dict[str, Any]:
        """The message as the API shows it (built only for the channels that send it whole)."""
        message = self.message
        if isinstance(message, Event):
            return event_json(message)
        return {
            "job_id": message.job_id,
            "seq": None,  # live: not in the log yet; the id still resumes exactly here
            "type": DELTA,
            "data": {
                "attempt": message.attempt,
                "index": message.index,
                "offset": message.offset,
                "text": message.text,
            },
            "created_at": iso(int(time.time() * 1000)),
        }


DELTA = EventType.OUTPUT_DELTA.value


def _event_item(event: Event, token: str) -> StreamItem:
    return StreamItem(token, event)


async def job_stream(
    queue: JobQueue,
    tenant: str,
    job_id: str,
    cursor: StreamCursor,
    *,
    poll_seconds: float,
    watching: tuple[Subscription, list[LiveDelta]] | None = None,
    subject: Job | None = None,
) -> AsyncGenerator[list[StreamItem], None]:
    """The job's events after ``cursor``, live, until the terminal one, in batches (what is
    ready at once: a channel sends a batch in one write). Raises NotFound (before yielding
    anything) for a job the tenant does not have. ``watching``: a subscription taken before the
    job was submitted (the facade's), so nothing can have been missed and the first token need
    not wait for a read of the store. Batches stream their events through here too, under the
    batch's id."""
    if watching is None:
        # ``subject``: the row whose events these are, already read (a batch's anchor).
        job = subject or await queue.get(tenant, job_id)
        subscription, backlog = queue.live.watch_job(job_id)
    else:
        subscription, backlog = watching
    try:
        if watching is None:
            # Replay what the store has, then the live text not yet written, then follow.
            history = await _catch_up(queue, job_id, cursor)
            if history:
                yield _until_terminal(history)
                if history[-1].terminal:
                    return
            if job.status.is_terminal:  # resumed after its end: nothing more will come
                return
        pending: list[Message] = list(backlog)
        while True:
            batch = await _relay(queue, job_id, cursor, pending)
            if batch:
                batch = _until_terminal(batch)
                yield batch
                if batch[-1].terminal:
                    return
            # A job running here reports everything through the hub; others are re-read now and
            # then (a cancel through another process, a worker elsewhere).
            local = job_id in queue.live.running
            quiet = not await subscription.wait(poll_seconds * (20 if local else 1))
            if quiet or subscription.lagged:
                if subscription.lagged:  # messages were dropped: the store has the durable ones
                    subscription.lagged = False
                    subscription.drain()
                # (Live text that arrived meanwhile stays in the inbox: the store lacks it.)
                caught_up = await _catch_up(queue, job_id, cursor)
                if caught_up:
                    caught_up = _until_terminal(caught_up)
                    yield caught_up
                    if caught_up[-1].terminal:
                        return
            pending = subscription.drain()
    finally:
        subscription.close()


def _until_terminal(items: list[StreamItem]) -> list[StreamItem]:
    """The items up to and including the terminal event (nothing follows it)."""
    for position, item in enumerate(items):
        if item.terminal:
            return items[: position + 1]
    return items


async def _relay(
    queue: JobQueue, job_id: str, cursor: StreamCursor, messages: list[Message]
) -> list[StreamItem]:
    """What to send for a batch of hub messages. Live text that arrived together goes out as one
    delta: under load, a stream sends fewer, larger messages instead of falling behind."""
    items: list[StreamItem] = []
    for message in messages:
        if isinstance(message, LiveDelta):
            delta = cursor.take_delta(message)
            if delta is None:
                continue
            last = items[-1].message if items else None
            if (
                isinstance(last, LiveDelta)
                and (last.attempt, last.index) == (delta.attempt, delta.index)
                and last.offset + len(last.text) == delta.offset
            ):
                delta = dataclasses.replace(last, text=last.text + delta.text)
                items.pop()
            items.append(StreamItem(cursor.token(), delta))
            continue
        if message.seq > cursor.seq + 1:  # a gap: written by another process
            items += await _catch_up(queue, job_id, cursor)
        taken = cursor.take_event(message)
        if taken is not None:
            items.append(_event_item(taken, cursor.token()))
    return items


async def _catch_up(queue: JobQueue, job_id: str, cursor: StreamCursor) -> list[StreamItem]:
    items = []
    while True:
        events = await queue.store.list_events(job_id, cursor.seq, limit=_PAGE)
        for event in events:
            taken = cursor.take_event(event)
            if taken is not None:
                items.append(_event_item(taken, cursor.token()))
        if len(events) < _PAGE:
            return items


async def tenant_stream(
    queue: JobQueue,
    tenant: str,
    after_id: int,
    types: Collection[str],
    *,
    poll_seconds: float,
    resync_seconds: float,
) -> AsyncIterator[list[StreamItem]]:
    """Every durable event of the tenant after store-wide id ``after_id`` (of ``types``, if
    given), without end, in batches. The store is the source; it is read when something says it
    has news, not on a timer (an idle stream costs nothing):

    - a committed event of the tenant, published in this process or relayed from another: read
      at once (at most every ``_READ_GAP`` seconds, so a busy tenant's events come in batches);
      while a read has not reached an event announced before it (on PostgreSQL, an event that
      committed after an older transaction still running), again every ``poll_seconds``;
    - a job of the tenant accepted here or (on PostgreSQL) in another process (accepts do not
      publish their ``job.queued`` here): a nudge, at most every ``poll_seconds``;
    - messages lost on the way (a relay or the broadcast reconnecting): at once;
    - and in case a wake-up was lost all the same, 1 s after the stream began, then at
      doubling intervals up to every ``resync_seconds``."""
    loop = asyncio.get_running_loop()
    queue.live.wake_tenants_on(queue.notifier, TENANT_ACCEPTED, poll_seconds)
    subscription = queue.live.watch_tenant(tenant)
    announced = 0  # the highest event id a message announced
    resync = min(_FIRST_RESYNC, resync_seconds)
    behind_since: float | None = None
    try:
        while True:
            announced = max(announced, _newest(subscription.drain()))
            subscription.lagged = subscription.nudged = False
            read_at = loop.time()
            events = await queue.store.list_tenant_events(tenant, after_id, limit=_PAGE)
            if events:
                after_id = events[-1].id
                batch = [
                    _event_item(event, str(event.id))
                    for event in events
                    if not types or event.type.value in types
                ]
                if batch:
                    yield batch
            if len(events) == _PAGE:
                continue
            behind = announced > after_id  # an event announced before the read, not in it
            if not behind:
                behind_since = None
            elif behind_since is None:
                behind_since = read_at
            elif read_at - behind_since > resync_seconds:  # (deleted meanwhile?) stop waiting
                announced, behind = after_id, False
            while True:  # until a reason to read again
                newest = _newest(subscription.drain())
                announced = max(announced, newest)
                if newest > after_id or subscription.lagged or subscription.nudged:
                    await asyncio.sleep(read_at + _READ_GAP - loop.time())
                    break
                due = read_at + (poll_seconds if behind else resync)
                if due <= loop.time():
                    if not behind:
                        resync = min(resync * 2, resync_seconds)
                    break
                await subscription.wait(due - loop.time())
    finally:
        subscription.close()


def _newest(messages: list[Message]) -> int:
    """The highest store-wide event id among ``messages`` (0 if none is an event)."""
    return max((m.id for m in messages if isinstance(m, Event)), default=0)
