"""The live hub and stream cursor as units: exact output across any interleaving of live text,
durable writes, late joins and disconnects (property-based)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hookline.events import Event, EventType
from hookline.jobs import JobStatus
from hookline.live.hub import BadResumeToken, LiveDelta, LiveHub, StreamCursor
from hookline.live.notify import TENANT_ACCEPTED, Notifier
from hookline.worker import RunningJob
from tests.test_store import make_job

JOB = "job_1"


@dataclasses.dataclass
class Producer:
    """A worker's side: chunks go live at once and are written (coalesced) at flush points."""

    hub: LiveHub
    log: list[Event] = dataclasses.field(default_factory=list)
    produced: int = 0
    flushed: int = 0
    pending: list[str] = dataclasses.field(default_factory=list)

    def event(self, type_: EventType, data: dict[str, object]) -> None:
        event = Event(len(self.log) + 1, JOB, "t", len(self.log) + 1, type_, data, 0)
        self.log.append(event)
        self.hub.publish_events([event])

    def chunk(self, text: str) -> None:
        self.hub.publish_delta(LiveDelta(JOB, "t", 1, 0, self.produced, text))
        self.produced += len(text)
        self.pending.append(text)

    def flush(self) -> None:
        if self.pending:
            text = "".join(self.pending)
            self.pending = []
            data = {"attempt": 1, "index": 0, "offset": self.flushed, "text": text}
            self.flushed += len(text)
            self.event(EventType.OUTPUT_DELTA, data)


class Watcher:
    """A client: connects (history, then the hub's backlog, then live), reads some messages,
    disconnects, resumes from the last id it saw."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.last_id: str | None = None
        self.done = False

    def connect(self, hub: LiveHub, log: list[Event]) -> tuple[StreamCursor, object]:
        cursor = StreamCursor.parse(self.last_id)
        subscription, backlog = hub.watch_job(JOB)
        for event in log:
            self._take_event(cursor, event)
        for delta in backlog:
            self._take_delta(cursor, delta)
        return cursor, subscription

    def _take_event(self, cursor: StreamCursor, event: Event) -> None:
        taken = cursor.take_event(event)
        if taken is None:
            return
        if taken.type == EventType.OUTPUT_DELTA:
            self.texts.append(taken.data["text"])
        self.done = taken.type.is_terminal
        self.last_id = cursor.token()

    def _take_delta(self, cursor: StreamCursor, delta: LiveDelta) -> None:
        taken = cursor.take_delta(delta)
        if taken is not None:
            self.texts.append(taken.text)
            self.last_id = cursor.token()

    def read(self, cursor: StreamCursor, messages: list[object], log: list[Event]) -> None:
        """As :func:`hookline.delivery.streams.job_stream` does: a gap in seq is filled from the log."""
        for message in messages:
            if isinstance(message, Event):
                for missed in log[cursor.seq : message.seq - 1]:
                    self._take_event(cursor, missed)
                self._take_event(cursor, message)
            elif isinstance(message, LiveDelta):
                self._take_delta(cursor, message)


steps = st.lists(
    st.one_of(
        st.tuples(st.just("chunk"), st.text(min_size=1, max_size=5)),
        st.tuples(st.just("flush"), st.none()),
        st.tuples(st.just("reconnect"), st.none()),
        st.tuples(st.just("lose_next"), st.none()),  # the next step's messages never arrive
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(steps=steps, join_at=st.integers(min_value=0, max_value=60))
def test_any_interleaving_yields_exactly_the_output(
    steps: list[tuple[str, str | None]], join_at: int
) -> None:
    hub = LiveHub()
    producer = Producer(hub)
    producer.event(EventType.QUEUED, {})
    producer.event(EventType.STARTED, {"attempt": 1})
    watcher = Watcher()
    connection = None
    output = ""
    losing = False
    for position, (action, text) in enumerate(steps):
        if connection is None and position >= join_at:
            connection = watcher.connect(hub, producer.log)
        if action == "chunk":
            assert text is not None
            producer.chunk(text)
            output += text
        elif action == "flush":
            producer.flush()
        elif connection is not None and action == "reconnect":
            connection[1].close()  # type: ignore[attr-defined]
            connection = watcher.connect(hub, producer.log)
        if connection is not None:
            messages = connection[1].drain()  # type: ignore[attr-defined]
            if not losing:
                watcher.read(connection[0], messages, producer.log)
        losing = action == "lose_next"
    producer.flush()
    producer.event(EventType.SUCCEEDED, {"attempt": 1})
    if connection is None:
        connection = watcher.connect(hub, producer.log)
    watcher.read(connection[0], connection[1].drain(), producer.log)  # type: ignore[attr-defined]
    assert watcher.done
    assert "".join(watcher.texts) == output


def test_resume_tokens_round_trip_and_bad_ones_are_refused() -> None:
    cursor = StreamCursor(seq=12, attempt=1, sent={(1, 0): 340, (1, 1): 95})
    assert cursor.token() == "12.1.340.95"
    assert StreamCursor.parse("12.1.340.95") == cursor
    assert StreamCursor.parse("7").token() == "7"
    assert StreamCursor.parse(None).seq == 0
    for bad in ["x", "1.2", "-3", "1..2", "1.2.", " 1 2", "1" * 16, "١٢"]:
        with pytest.raises(BadResumeToken):
            StreamCursor.parse(bad)


def test_a_slow_watcher_is_cut_off_from_live_messages_not_left_to_grow() -> None:
    hub = LiveHub()
    subscription, _ = hub.watch_job(JOB)
    for i in range(20_001):
        hub.publish_delta(LiveDelta(JOB, "t", 1, 0, i, "x"))
    assert subscription.lagged
    assert len(subscription.drain()) <= 10_000
    subscription.close()
    assert not hub.watching(JOB)


async def test_text_held_during_an_accept_is_shown_exactly_when_a_flush_comes_first() -> None:
    """A job started while its accept commits holds its text until the commit; the output flush
    can run between the commit and the showing of the held text. The watcher still gets exactly
    the output: the flushed part as its durable event, the rest live at its true offset."""
    hub = LiveHub()
    producer = Producer(hub)
    producer.event(EventType.QUEUED, {})
    producer.event(EventType.STARTED, {"attempt": 1})
    job = make_job(
        "t", id=JOB, status=JobStatus.RUNNING, attempts=1, lease_token="lease_1", event_seq=2
    )
    accepted = asyncio.get_running_loop().create_future()
    running = RunningJob(job, "lease_1", hub, accepted=accepted)
    watcher = Watcher()
    cursor, subscription = watcher.connect(hub, producer.log)
    running.add_delta(0, "Hel")
    accepted.set_result(True)  # committed; the worker's callback that shows held text runs later
    flushing = running.take_deltas()  # the flush loop's turn came first; its commit comes later
    running.add_delta(0, "lo")
    running.publish_held()
    watcher.read(cursor, subscription.drain(), producer.log)  # type: ignore[attr-defined]
    for new in flushing:
        producer.event(new.type, new.data)
    watcher.read(cursor, subscription.drain(), producer.log)  # type: ignore[attr-defined]
    for new in running.take_deltas():  # the job's last write
        producer.event(new.type, new.data)
    producer.event(EventType.SUCCEEDED, {"attempt": 1})
    watcher.read(cursor, subscription.drain(), producer.log)  # type: ignore[attr-defined]
    assert watcher.done
    assert "".join(watcher.texts) == "Hello"


def test_a_finished_job_is_kept_for_its_watchers_only_while_they_watch() -> None:
    hub = LiveHub()
    job = make_job(status=JobStatus.RUNNING).evolve(
        status=JobStatus.SUCCEEDED, output={"text": "x" * 1000}
    )
    subscription, _ = hub.watch_job(job.id)
    end = Event(1, job.id, job.tenant, 1, EventType.SUCCEEDED, {"attempt": 1}, 0)
    hub.publish_events([end], job=job)
    subscription.close()  # a watcher that left without taking it (an SSE client)
    assert hub.finished(job.id) is None  # not held, output and all, for a thousand more jobs
    taker, _ = hub.watch_job(job.id)
    hub.publish_events([end], job=job)
    assert hub.finished(job.id) is job  # (the facade takes it while it still watches)
    taker.close()


async def test_an_accept_nudges_only_its_tenants_streams_and_at_a_pace() -> None:
    hub, notifier = LiveHub(), Notifier()
    hub.wake_tenants_on(notifier, TENANT_ACCEPTED, pace=0.2)
    mine, theirs = hub.watch_tenant("acme"), hub.watch_tenant("other")
    notifier.publish(TENANT_ACCEPTED, "acme")
    await asyncio.sleep(0.01)
    assert mine.nudged and not theirs.nudged  # every stream of every tenant, before
    mine.nudged = False
    for _ in range(10):  # a burst within the pace: one more nudge, at its end
        notifier.publish(TENANT_ACCEPTED, "acme")
    await asyncio.sleep(0.05)
    assert not mine.nudged
    await asyncio.sleep(0.25)
    assert mine.nudged and not theirs.nudged
    mine.close()
    theirs.close()
