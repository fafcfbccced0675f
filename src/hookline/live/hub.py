"""Live fan-out of job events to the streams watching them (SSE, WebSocket, the OpenAI facade).

Two kinds of message reach a watcher:

- committed events (:class:`~hookline.events.Event`), published right after their transaction;
- :class:`LiveDelta` — output text the moment the upstream produced it, before the worker's
  coalesced ``job.output.delta`` write (every ``delta_flush_seconds``) makes it durable.

Every piece of output text has an absolute position: ``offset`` counts the characters of one
(attempt, choice index) before it, in live deltas and in the durable delta events alike. A
:class:`StreamCursor` remembers, per watcher, the last durable ``seq`` it passed and how much text
of each choice it has sent, so a durable event repeating text already sent live is trimmed and a
live delta that would leave a gap is held back (the durable event brings the text moments later).
Its resume token (the SSE id) encodes both, so a client resuming with ``Last-Event-ID`` gets
exactly the text it lacks: never a token lost, never one repeated.

The hub is in-process. A watcher in a process without the job's worker sees the durable events
(by re-reading the store) but not the live deltas before they are written.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Callable, Iterable

from hookline.events import Event, EventType
from hookline.jobs import Job
from hookline.live.notify import Notifier

# A watcher that falls this far behind is cut off from live messages and catches up from the
# store (which holds every durable event): memory stays bounded whatever the client's speed.
MAX_BACKLOG = 10_000
_FINISHED_KEPT = 1_000


@dataclasses.dataclass(frozen=True, slots=True)
class LiveDelta:
    job_id: str
    tenant: str
    attempt: int
    index: int
    offset: int
    text: str


Message = Event | LiveDelta


@dataclasses.dataclass(slots=True)
class _Tail:
    """Live text of one (attempt, index) not yet written: characters [start, end)."""

    start: int
    end: int
    parts: list[str] = dataclasses.field(default_factory=list)


class Subscription:
    """A watcher's inbox. ``lagged`` means messages were dropped: re-read the store."""

    def __init__(self, hub: LiveHub, key: str) -> None:
        self._hub = hub
        self._key = key
        self._inbox: collections.deque[Message] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        # One timer at most, kept from wait to wait and re-armed when it fires before the current
        # wait's deadline: a stream waits once per token, and an asyncio.timeout per wait (a timer
        # set and cancelled each time) was ~5% of the CPU of a relayed token.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.lagged = False
        # Something may have been written that no message announces (a tenant stream's jobs
        # accepted): re-read the store, keeping what the inbox holds.
        self.nudged = False

    def put(self, message: Message) -> None:
        if len(self._inbox) >= MAX_BACKLOG:
            self._inbox.clear()
            self.lagged = True
        else:
            self._inbox.append(message)
        self._wake()

    def drain(self) -> list[Message]:
        messages = list(self._inbox)
        self._inbox.clear()
        return messages

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a message (or a nudge); True if one is there."""
        if self._inbox or self.lagged or self.nudged:
            return True
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + timeout
        if self._timer is not None and self._timer.when() > self._deadline:
            self._timer.cancel()  # an earlier, longer wait's: too late for this one
            self._timer = None
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._on_timer)
        self._waiter = waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        # On a timeout, a message put in the same loop turn is there all the same.
        return bool(self._inbox) or self.lagged or self.nudged

    def _on_timer(self) -> None:
        self._timer = None
        if self._waiter is None:
            return  # nobody waits: the next wait sets a timer again
        loop = asyncio.get_running_loop()
        if loop.time() >= self._deadline:
            self._wake()
        else:  # set by an earlier wait: this one's deadline is later
            self._timer = loop.call_at(self._deadline, self._on_timer)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def mark_lagged(self) -> None:
        """Messages meant for this watcher were lost: it re-reads the store."""
        self.lagged = True
        self._wake()

    def nudge(self) -> None:
        """The store may have news for this watcher that no message announces."""
        self.nudged = True
        self._wake()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._hub._unsubscribe(self._key, self)


class LiveHub:
    def __init__(self) -> None:
        self._watchers: dict[str, set[Subscription]] = {}
        # Per running job, the live text not yet durable, per (attempt, index): (offset, parts).
        # A late joiner gets it at once instead of waiting for the next durable write.
        self._tails: dict[str, dict[tuple[int, int], _Tail]] = {}
        # Called with every message published here (not with relayed ones): the relay to other
        # processes (hookline.live.relay).
        self.taps: list[Callable[[Message], None]] = []
        # Called with the key (``job:<id>``, ``tenant:<t>``) of each new subscription: on
        # PostgreSQL, other processes are asked to forward that key's messages (hookline.live.broadcast).
        self.watch_hooks: list[Callable[[str], None]] = []
        # Jobs this process's worker is running: their events all pass through here, so their
        # streams need not re-read the store to find what other processes wrote.
        self.running: set[str] = set()
        # Jobs that just finished here, so a stream ending with them needs no read of the store.
        self._finished: collections.OrderedDict[str, Job] = collections.OrderedDict()
        # Per tenant, when its streams were last nudged, and the nudge due (see wake_tenants_on).
        self._nudged_at: dict[str, float] = {}
        self._nudges: dict[str, asyncio.TimerHandle] = {}
        self._nudge_topics: set[str] = set()

    # --- watchers

    def watch_job(self, job_id: str) -> tuple[Subscription, list[LiveDelta]]:
        """Subscribe to one job; also returns the live text not yet durable, as deltas."""
        return self._subscribe(f"job:{job_id}"), self.unwritten([job_id])

    def live_text(self) -> list[LiveDelta]:
        """Every running job's text not written yet, as deltas (for a relay that just joined)."""
        return self.unwritten(list(self._tails))

    def unwritten(self, job_ids: list[str]) -> list[LiveDelta]:
        return [
            LiveDelta(job_id, "", attempt, index, tail.start, "".join(tail.parts))
            for job_id in job_ids
            for (attempt, index), tail in self._tails.get(job_id, {}).items()
            if tail.parts
        ]

    def watch_tenant(self, tenant: str) -> Subscription:
        """Committed events of every job of the tenant (no live text)."""
        return self._subscribe(f"tenant:{tenant}")

    def _subscribe(self, key: str) -> Subscription:
        subscription = Subscription(self, key)
        self._watchers.setdefault(key, set()).add(subscription)
        for hook in self.watch_hooks:
            hook(key)
        return subscription

    def _unsubscribe(self, key: str, subscription: Subscription) -> None:
        watchers = self._watchers.get(key)
        if watchers is not None:
            watchers.discard(subscription)
            if not watchers:
                del self._watchers[key]
                if key.startswith("job:"):  # nobody left to take it: an output is not kept
                    self._finished.pop(key[4:], None)
                else:
                    self._nudged_at.pop(key.removeprefix("tenant:"), None)

    def watching(self, job_id: str) -> bool:
        return f"job:{job_id}" in self._watchers

    def subscribers(self) -> dict[str, int]:
        """How many streams watch here, by what they watch (``job``, ``tenant``)."""
        counts = {"job": 0, "tenant": 0}
        for key, watchers in self._watchers.items():
            kind = key.partition(":")[0]
            counts[kind] = counts.get(kind, 0) + len(watchers)
        return counts

    def watched_keys(self) -> list[str]:
        """The keys somebody here subscribes to (``job:<id>``, ``tenant:<t>``)."""
        return list(self._watchers)

    def poke(self, key: str) -> None:
        """Messages for ``key`` may have been lost on the way here: its watchers re-read the store."""
        for subscription in self._watchers.get(key, ()):
            subscription.mark_lagged()

    def poke_tenants(self) -> None:
        """Messages may have been lost on the way here (a relay connection began or ended): every
        tenant stream re-reads the store. (A job stream finds a gap by itself.)"""
        for key in self.watched_keys():
            if key.startswith("tenant:"):
                self.poke(key)

    def wake_tenants_on(self, notifier: Notifier, topic: str, pace: float) -> None:
        """Nudge a tenant's streams when ``topic`` is published with the tenant as its payload,
        at most once per ``pace`` seconds per tenant: for writes whose events are not published
        here, jobs accepted (their ``job.queued``). Called again for the same topic, does
        nothing."""
        if topic in self._nudge_topics:
            return
        self._nudge_topics.add(topic)
        notifier.subscribe(topic, lambda tenant: self._schedule_nudge(tenant, pace))

    def _schedule_nudge(self, tenant: str, pace: float) -> None:
        if tenant in self._nudges or f"tenant:{tenant}" not in self._watchers:
            return  # one is due (it covers this too), or nobody here watches the tenant
        loop = asyncio.get_running_loop()
        at = max(loop.time(), self._nudged_at.get(tenant, 0.0) + pace)
        self._nudges[tenant] = loop.call_at(at, self._nudge_tenant, tenant)

    def _nudge_tenant(self, tenant: str) -> None:
        del self._nudges[tenant]
        self._nudged_at[tenant] = asyncio.get_running_loop().time()
        for subscription in self._watchers.get(f"tenant:{tenant}", ()):
            subscription.nudge()

    # --- publishers

    def publish_delta(self, delta: LiveDelta, *, relayed: bool = False) -> None:
        """Output text straight from the upstream (the worker calls this per chunk; the relays
        with ``relayed``). The text not yet written is kept for every running job, relayed ones
        too, so a watcher that joins late gets it at once; a durable delta trims it, the job's end
        drops it."""
        tails = self._tails.setdefault(delta.job_id, {})
        tail = tails.setdefault((delta.attempt, delta.index), _Tail(delta.offset, delta.offset))
        if not tail.parts:
            tail.start = tail.end = delta.offset
        if delta.offset == tail.end:  # contiguous; anything else is a repeat
            tail.parts.append(delta.text)
            tail.end += len(delta.text)
        for subscription in self._watchers.get(f"job:{delta.job_id}", ()):
            subscription.put(delta)
        if not relayed:
            for tap in self.taps:
                tap(delta)

    def publish_events(
        self, events: Iterable[Event], *, job: Job | None = None, relayed: bool = False
    ) -> None:
        """Events just committed, in ``seq`` order per job; ``job``: the job as they left it."""
        for event in events:
            if event.type == EventType.OUTPUT_DELTA:
                self._made_durable(event)
            elif event.type.is_terminal:
                self._tails.pop(event.job_id, None)
                if job is not None and job.id == event.job_id and self.watching(job.id):
                    self._finished[job.id] = job  # for its watchers; taken by the first
                    while len(self._finished) > _FINISHED_KEPT:
                        self._finished.popitem(last=False)
            for key in (f"job:{event.job_id}", f"tenant:{event.tenant}"):
                for subscription in self._watchers.get(key, ()):
                    subscription.put(event)
            if not relayed:
                for tap in self.taps:
                    tap(event)

    def _made_durable(self, event: Event) -> None:
        tail = self._tails.get(event.job_id, {}).get(
            (event.data.get("attempt", 0), event.data.get("index", 0))
        )
        if tail is None or not tail.parts:
            return
        written_to = event.data.get("offset", tail.start) + len(event.data.get("text", ""))
        rest = "".join(tail.parts)[max(0, written_to - tail.start) :]
        tail.start = max(tail.start, written_to)
        tail.parts = [rest] if rest else []
        tail.end = tail.start + len(rest)

    def finished(self, job_id: str) -> Job | None:
        """The job as it finished in this process (recently, while watched), if it did."""
        return self._finished.pop(job_id, None)

    def forget(self, job_id: str) -> None:
        """The job stopped running here (finished, released, lost): drop its live text."""
        self._tails.pop(job_id, None)


class BadResumeToken(ValueError):
    pass


@dataclasses.dataclass
class StreamCursor:
    """One watcher's position: the last durable ``seq`` passed, and how many characters of each
    (attempt, index) it has been sent (live or durable)."""

    seq: int = 0
    attempt: int = 0
    sent: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, token: str | None) -> StreamCursor:
        """``"12"`` (after event 12) or ``"12.1.340"`` (and 340 characters of attempt 1, choice 0
        beyond it; ``"12.1.340.95"`` adds choice 1)."""
        if token is None or token.strip() == "":
            return cls()
        parts = token.strip().split(".")
        if not all(p.isascii() and p.isdigit() and len(p) <= 15 for p in parts) or len(parts) == 2:
            raise BadResumeToken(f"not an event id of this stream: {token[:60]!r}")
        cursor = cls(seq=int(parts[0]))
        if len(parts) > 2:
            cursor.attempt = int(parts[1])
            for index, count in enumerate(parts[2:]):
                cursor.sent[(cursor.attempt, index)] = int(count)
        return cursor

    def token(self) -> str:
        first = self.sent.get((self.attempt, 0))
        if first is not None and len(self.sent) == 1:  # the common case: one choice, one attempt
            return f"{self.seq}.{self.attempt}.{first}" if first else str(self.seq)
        by_index = {i: n for (a, i), n in self.sent.items() if a == self.attempt}
        if not any(by_index.values()):
            return str(self.seq)
        width = max(by_index) + 1
        return ".".join(
            map(str, [self.seq, self.attempt, *(by_index.get(i, 0) for i in range(width))])
        )

    def take_event(self, event: Event) -> Event | None:
        """The event to send for a durable one (its text trimmed of what was sent live), or None
        when there is nothing new in it."""
        if event.seq <= self.seq:
            return None
        self.seq = event.seq
        if event.type == EventType.STARTED:
            self.attempt = max(self.attempt, int(event.data.get("attempt", 0)))
        if event.type != EventType.OUTPUT_DELTA:
            return event
        attempt = int(event.data.get("attempt", 0))
        index = int(event.data.get("index", 0))
        text: str = event.data.get("text", "")
        have = self.sent.get((attempt, index), 0)
        offset = int(event.data.get("offset", have))
        self.sent[(attempt, index)] = max(have, offset + len(text))
        skip = have - offset
        if skip <= 0:
            return event
        if skip >= len(text):
            return None
        data = {**event.data, "text": text[skip:], "offset": offset + skip}
        return dataclasses.replace(event, data=data)

    def take_delta(self, delta: LiveDelta) -> LiveDelta | None:
        """The part of a live delta the watcher lacks, or None (already sent, or it would leave
        a gap that the durable event will fill)."""
        key = (delta.attempt, delta.index)
        have = self.sent.get(key, 0)
        end = delta.offset + len(delta.text)
        if delta.offset > have or end <= have or delta.attempt < self.attempt:
            return None
        self.attempt = delta.attempt
        self.sent[key] = end
        if have == delta.offset:
            return delta
        skip = have - delta.offset
        return LiveDelta(
            delta.job_id, delta.tenant, delta.attempt, delta.index, have, delta.text[skip:]
        )
