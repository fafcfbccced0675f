"""Wake-ups and live output between processes on PostgreSQL, over LISTEN/NOTIFY.

API and worker processes may run on many machines against one PostgreSQL and share nothing else.
Each opens one dedicated connection that LISTENs on channel ``hookline`` and NOTIFYs it:

- every notifier topic published here (``jobs.available``, ``job:<id>``, ``job.cancelled``,
  ``deliveries.available``, ``keys.revoked``) is published in every other process: a worker
  claims a job the moment another process accepted it, a long-poll returns the moment a worker
  elsewhere finished the job, a cancel aborts the upstream call wherever it runs, an idle sender
  wakes for a new message, a revoked API key is refused by every API process at once. A process
  that runs no broadcast (``hookline keys revoke``) sends its topic with :func:`publish_once`;
- live messages (output text per upstream chunk, committed events) of the jobs and tenants that
  some other process watches, so a stream served by one process follows a job run by another
  token by token. A process announces what its streams watch (renewed every ``_RENEW_SECONDS``,
  forgotten ``_WATCH_SECONDS`` after the last renewal, and told at once to a process that joins
  and asks), and the others forward only that; a job newly watched gets its not-yet-written text
  at once.

Whatever is queued while a NOTIFY is on its way goes out together in the next (several NOTIFYs
when it would pass PostgreSQL's 8000-byte payload limit). NOTIFY is not durable and the connection
can drop, so nothing depends on it for correctness: streams re-read the store on a gap or a quiet
spell, the claim loop and the sender poll, and after a reconnect every watcher re-reads at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

import asyncpg
import orjson
import stamina
from sqlalchemy.engine import make_url

from hookline.events import Event
from hookline.live.hub import LiveDelta, LiveHub, Message
from hookline.live.notify import DELIVERIES_AVAILABLE, JOBS_AVAILABLE, KEYS_REVOKED, Notifier
from hookline.live.relay import pack, unpack
from hookline.observability.health import Check

log = logging.getLogger("hookline.live.broadcast")

CHANNEL = "hookline"
_MAX_PAYLOAD = 7_800  # bytes; PostgreSQL refuses a NOTIFY payload of 8000 or more
_TEXT_PIECE = 1_000  # characters of one delta per item: even escaped, well under the limit
_PING_SECONDS = 5.0  # an idle connection is checked this often (a dead one is replaced)
_RENEW_SECONDS = 10.0
_WATCH_SECONDS = 30.0
_RECONNECT_MAX_SECONDS = 5.0


def notify_dsn(database_url: str) -> str:
    """The plain ``postgresql://`` DSN asyncpg takes, from hookline's database URL."""
    url = make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def publish_once(database_url: str, topic: str, payload: str = "") -> None:
    """Publish ``topic`` in every process with a :class:`Broadcast` on the database, from a
    process that runs none (one NOTIFY, on a connection of its own)."""
    body = orjson.dumps({"o": secrets.token_hex(6), "i": [["t", topic, payload]]}).decode()
    connection = await asyncpg.connect(notify_dsn(database_url), timeout=_PING_SECONDS)
    try:
        await connection.execute("SELECT pg_notify($1, $2)", CHANNEL, body, timeout=_PING_SECONDS)
    finally:
        await connection.close()


class Broadcast:
    def __init__(self, database_url: str, notifier: Notifier, hub: LiveHub) -> None:
        self.dsn = notify_dsn(database_url)
        self.notifier = notifier
        self.hub = hub
        self.origin = secrets.token_hex(6)  # this process's mark: its own NOTIFYs come back to it
        self.connected = asyncio.Event()
        self._items: list[bytes] = []  # JSON items waiting for the next NOTIFY
        self._topics: set[tuple[str, str]] = set()  # the topics among them
        self._ready = asyncio.Event()
        self._remote_watches: dict[str, float] = {}  # key -> loop time the watch lapses
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.notifier.forward = self._forward_topic
        self.hub.taps.append(self._tap)
        self.hub.watch_hooks.append(self._announce_watch)
        self._task = asyncio.create_task(self._run(), name="hookline-broadcast")
        with contextlib.suppress(TimeoutError):  # not fatal: the connection is retried
            async with asyncio.timeout(_PING_SECONDS):
                await self.connected.wait()

    async def stop(self) -> None:
        self.notifier.forward = None
        with contextlib.suppress(ValueError):
            self.hub.taps.remove(self._tap)
        with contextlib.suppress(ValueError):
            self.hub.watch_hooks.remove(self._announce_watch)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # --- what goes out

    async def health(self) -> Check:
        """The LISTEN connection: up, or being reconnected (wake-ups wait for polls meanwhile)."""
        if self.connected.is_set():
            return Check("ok", required=False)
        detail = (
            "the LISTEN connection is down and being reconnected; wake-ups fall back to polling"
        )
        return Check("failing", required=False, detail=detail)

    def _queue(self, item: list[Any]) -> None:
        if not self.connected.is_set():
            return  # nobody to tell: after the reconnect, everyone re-reads (see _resync)
        self._items.append(orjson.dumps(item))
        self._ready.set()

    def _forward_topic(self, topic: str, payload: str) -> None:
        if (topic, payload) in self._topics:
            return  # already on its way: a burst of accepts sends "jobs.available" once
        self._topics.add((topic, payload))
        self._queue(["t", topic, payload])

    def _announce_watch(self, key: str) -> None:
        self._queue(["w", key])  # a new watcher: it also wants the text not written yet

    def _watched_elsewhere(self, key: str) -> bool:
        lapses = self._remote_watches.get(key)
        if lapses is None:
            return False
        if lapses < asyncio.get_running_loop().time():
            del self._remote_watches[key]
            return False
        return True

    def _tap(self, message: Message) -> None:
        if isinstance(message, LiveDelta):
            if self._watched_elsewhere(f"job:{message.job_id}"):
                self._send_delta(message)
            return
        keys = [f"job:{message.job_id}", f"tenant:{message.tenant}"]
        if any(self._watched_elsewhere(key) for key in keys):
            self._send_event(message, keys)

    def _send_delta(self, delta: LiveDelta) -> None:
        text = delta.text
        for start in range(0, max(len(text), 1), _TEXT_PIECE):
            piece = text[start : start + _TEXT_PIECE]
            self._queue(["m", pack(LiveDelta(delta.job_id, delta.tenant, delta.attempt,
                                             delta.index, delta.offset + start, piece))])  # fmt: skip

    def _send_event(self, event: Event, keys: list[str]) -> None:
        item = orjson.dumps(["m", pack(event)])
        if not self.connected.is_set():
            return
        if len(item) <= _MAX_PAYLOAD - 64:
            self._items.append(item)
            self._ready.set()
        else:  # too big for a NOTIFY: its watchers read it from the store
            for key in keys:
                self._queue(["p", key])

    def _payloads(self) -> list[str]:
        """The queued items as NOTIFY payloads, each under the size limit."""
        items, self._items = self._items, []
        self._topics.clear()
        head = b'{"o":"%s","i":[' % self.origin.encode()
        payloads: list[str] = []
        current: list[bytes] = []
        size = len(head) + 2
        for item in items:
            if current and size + len(item) + 1 > _MAX_PAYLOAD:
                payloads.append((head + b",".join(current) + b"]}").decode())
                current, size = [], len(head) + 2
            current.append(item)
            size += len(item) + 1
        if current:
            payloads.append((head + b",".join(current) + b"]}").decode())
        return payloads

    # --- what comes in

    def _received(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            body = orjson.loads(payload)
            if body["o"] == self.origin:
                return
            for item in body["i"]:
                self._take(item)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed broadcast: %s", exc)

    def _take(self, item: list[Any]) -> None:
        kind = item[0]
        if kind == "t":
            self.notifier.publish(item[1], item[2], remote=True)
        elif kind == "m":
            message = unpack(item[1])
            if isinstance(message, LiveDelta):
                self.hub.publish_delta(message, relayed=True)
            else:
                self.hub.publish_events([message], relayed=True)
        elif kind in ("w", "r"):
            key = item[1]
            self._remote_watches[key] = asyncio.get_running_loop().time() + _WATCH_SECONDS
            if kind == "w" and key.startswith("job:"):
                for delta in self.hub.unwritten([key.removeprefix("job:")]):
                    self._send_delta(delta)  # what the new watcher would otherwise wait for
        elif kind == "p":
            self.hub.poke(item[1])
        elif kind == "q":  # a process joined: tell it what the streams here watch
            for key in self.hub.watched_keys():
                self._queue(["r", key])

    # --- the connection

    async def _run(self) -> None:
        first = True
        while True:
            connection = await self._connect()
            try:
                await connection.add_listener(CHANNEL, self._received)
                self.connected.set()
                if not first:
                    self._resync()
                first = False
                # What do the others' streams watch? Their renewals are seconds apart, and till
                # then this process would forward them nothing of the jobs it runs.
                self._queue(["q"])
                await self._serve(connection)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("broadcast: connection lost (%s); reconnecting", exc)
            finally:
                self.connected.clear()
                connection.terminate()

    async def _connect(self) -> asyncpg.Connection:
        """A connection, however long PostgreSQL takes to come back (backoff up to
        ``_RECONNECT_MAX_SECONDS`` between tries)."""
        async for attempt in stamina.retry_context(
            on=(OSError, asyncpg.PostgresError, TimeoutError),
            attempts=None,
            timeout=None,
            wait_initial=0.1,
            wait_max=_RECONNECT_MAX_SECONDS,
            wait_jitter=0.1,
        ):
            with attempt:
                try:
                    return await asyncpg.connect(self.dsn, timeout=_PING_SECONDS)
                except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                    log.warning("broadcast: cannot connect to PostgreSQL (%s); retrying", exc)
                    raise
        raise AssertionError("unreachable: the retries never end")

    def _resync(self) -> None:
        """After an outage anything may have been missed: wake the local waiters and every other
        process's, have every process re-read the API keys it cached (one revoked meanwhile is
        refused at once, not only when its cache lapses), and let every watcher re-read the
        store."""
        for topic in (JOBS_AVAILABLE, DELIVERIES_AVAILABLE, KEYS_REVOKED):
            self.notifier.publish(topic)
        for key in self.hub.watched_keys():
            self.hub.poke(key)
            self._announce_watch(key)

    async def _serve(self, connection: asyncpg.Connection) -> None:
        loop = asyncio.get_running_loop()
        renew_at = loop.time() + _RENEW_SECONDS
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_PING_SECONDS):
                    await self._ready.wait()
            self._ready.clear()
            if loop.time() >= renew_at:
                renew_at = loop.time() + _RENEW_SECONDS
                for key in self.hub.watched_keys():
                    self._queue(["r", key])  # renewal
            payloads = self._payloads()
            if not payloads:
                await connection.execute("SELECT 1", timeout=_PING_SECONDS)
            for payload in payloads:
                await connection.execute(
                    "SELECT pg_notify($1, $2)", CHANNEL, payload, timeout=_PING_SECONDS
                )
