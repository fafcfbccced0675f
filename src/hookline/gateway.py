"""Wires the parts together: store, queue, keys, upstreams and (optionally) the worker.

``hookline serve`` runs one Gateway with both the API and the worker; ``hookline api`` and ``hookline
worker`` run one each, sharing only the database.
"""

from __future__ import annotations

import logging

from hookline.auth import KeyRing
from hookline.batches import BatchRunner, BatchService
from hookline.broadcast import Broadcast
from hookline.clock import Clock, SystemClock
from hookline.config import Settings
from hookline.notify import Notifier
from hookline.queue import JobQueue
from hookline.relay import RelayClient, RelayServer, relay_directory
from hookline.sender import WebhookSender
from hookline.ssrf import AddressPolicy
from hookline.store import SQLStore, open_store
from hookline.store.database import SQLiteDatabase, sqlite_path
from hookline.upstreams import build_upstreams
from hookline.worker import Worker

log = logging.getLogger("hookline")


class Gateway:
    def __init__(
        self,
        settings: Settings,
        *,
        run_worker: bool = True,
        serve_api: bool = True,
        clock: Clock | None = None,
        migrate: bool = True,
    ) -> None:
        self.settings = settings
        self.migrate = migrate  # bring the schema up to date at start (else: hookline migrate)
        self.run_worker = run_worker
        self.serve_api = serve_api
        self.clock = clock or SystemClock()
        self.notifier = Notifier()
        self._store: SQLStore | None = None
        self._queue: JobQueue | None = None
        self._keys: KeyRing | None = None
        self.worker: Worker | None = None
        self.sender: WebhookSender | None = None
        self.batch_runner: BatchRunner | None = None
        self._batches: BatchService | None = None
        self.address_policy = AddressPolicy(settings.webhooks)
        self._relays: list[RelayServer | RelayClient | Broadcast] = []

    @property
    def store(self) -> SQLStore:
        assert self._store is not None, "Gateway.start() first"
        return self._store

    @property
    def queue(self) -> JobQueue:
        assert self._queue is not None, "Gateway.start() first"
        return self._queue

    @property
    def batches(self) -> BatchService:
        assert self._batches is not None, "Gateway.start() first"
        return self._batches

    @property
    def keys(self) -> KeyRing:
        assert self._keys is not None, "Gateway.start() first"
        return self._keys

    async def start(self, *, migrate: bool | None = None) -> None:
        migrate = self.migrate if migrate is None else migrate
        self._store = await open_store(self.settings.database_url, migrate=migrate)
        self._queue = JobQueue(self._store, self.settings, clock=self.clock, notifier=self.notifier)
        self._keys = KeyRing(self._store, self.clock)
        self._batches = BatchService(self._store.batches, self._queue, self.settings, self.clock)
        if self.store.dialect == "postgresql":  # before the worker: its first wake-ups cross
            await self._start_broadcast()
        if isinstance(self._store.database, SQLiteDatabase):
            running = self._queue.live.running
            self._store.database.quiet = lambda: len(running) <= 1
        if self.run_worker:
            self.worker = Worker(self._queue, build_upstreams(self.settings), self.settings.worker)
            await self.worker.start()
            self.sender = WebhookSender(
                self._store.webhooks, self.settings.webhooks, self.clock, self.notifier
            )
            await self.sender.start()
            self.batch_runner = BatchRunner(self._batches)
            await self.batch_runner.start()
        await self._start_relays()
        upstreams = ", ".join(f"{u.name} ({u.type})" for u in self.settings.upstreams) or "none"
        log.info("hookline started: database %s, upstreams: %s", self._store.dialect, upstreams)

    async def _start_broadcast(self) -> None:
        """On PostgreSQL, wake-ups and live output cross between the processes over LISTEN/NOTIFY
        (hookline.broadcast)."""
        broadcast = Broadcast(self.settings.database_url, self.notifier, self.queue.live)
        self._relays.append(broadcast)
        await broadcast.start()

    async def _start_relays(self) -> None:
        """Between the processes sharing a SQLite file, live output crosses over Unix sockets
        (hookline.relay); a worker's socket appears once the worker runs."""
        path = sqlite_path(self.settings.database_url)
        if path is None:
            return
        directory = relay_directory(path)
        if self.run_worker:
            self._relays.append(RelayServer(self.queue.live, directory))
        if self.serve_api:
            self._relays.append(RelayClient(self.queue.live, directory))
        for relay in self._relays:
            await relay.start()

    async def stop(self) -> None:
        """Drain the worker, finish pending accepts, close the database. Safe to call twice."""
        if self.worker is not None:
            await self.worker.stop()
            self.worker = None
        if self.sender is not None:
            await self.sender.stop()
            self.sender = None
        if self.batch_runner is not None:
            await self.batch_runner.stop()
            self.batch_runner = None
        for relay in self._relays:  # after the drain: a requeued job wakes the other workers
            await relay.stop()
        self._relays = []
        if self._queue is not None:
            await self._queue.close()
            self._queue = None
        if self._store is not None:
            await self._store.close()
            self._store = None
