"""Wires the parts together: store, queue, keys, upstreams and (optionally) the worker.

``hookline serve`` runs one Gateway with both the API and the worker; ``hookline api`` and ``hookline
worker`` run one each, sharing only the database.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Coroutine, Iterator
from typing import Any

from hookline.auth import KeyRing
from hookline.batches import BatchRunner, BatchService
from hookline.clock import Clock, SystemClock
from hookline.config import Settings
from hookline.deliveries import SinkRoute, SinkRoutes
from hookline.delivery.sinks import Sinks
from hookline.delivery.webhooks.sender import WebhookSender
from hookline.delivery.webhooks.ssrf import DEV_NETWORKS, AddressPolicy
from hookline.live.broadcast import Broadcast
from hookline.live.notify import Notifier
from hookline.live.relay import RelayClient, RelayServer, relay_directory
from hookline.observability import HealthCheck, Metrics, NoMetrics, OpenTelemetry, Telemetry
from hookline.observability.metrics import serve_metrics
from hookline.queue import JobQueue
from hookline.store import SQLStore, open_store
from hookline.store.database import Database
from hookline.store.migrate import schema_state, upgrade
from hookline.upstreams import build_upstreams
from hookline.upstreams.provider_batches import batch_client
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
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.migrate = migrate  # bring the schema up to date at start (else: hookline migrate)
        self.run_worker = run_worker
        self.serve_api = serve_api
        self.clock = clock or SystemClock()
        self.notifier = Notifier()
        self._store: SQLStore | None = None
        self._database: Database | None = None
        self._queue: JobQueue | None = None
        self._keys: KeyRing | None = None
        self.worker: Worker | None = None
        self.sender: WebhookSender | None = None
        self.batch_runner: BatchRunner | None = None
        self._batches: BatchService | None = None
        self.address_policy = AddressPolicy(settings.webhooks, dev=settings.dev)
        self._relays: list[RelayServer | RelayClient | Broadcast] = []
        self.role = ("serve" if serve_api else "worker") if run_worker else "api"
        self.telemetry = telemetry or _telemetry(settings, self.role)
        self._metrics_server: Any = None
        # What /readyz runs besides the database's own checks: the parts register theirs.
        self.checks: dict[str, HealthCheck] = {}
        # The data sinks, as the outbox routes to them (every process that writes events).
        self.sink_routes = SinkRoutes(
            SinkRoute(s.name, tuple(s.events), tuple(s.tenants), s.all_jobs) for s in settings.sinks
        )

    @property
    def store(self) -> SQLStore:
        assert self._store is not None, "Gateway.start() first"
        return self._store

    @property
    def database(self) -> Database:
        """The database under the store: its migrations, capabilities and readiness."""
        assert self._database is not None, "Gateway.start() first"
        return self._database

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
        """Open the store and start the parts this process runs. If a step fails (or the start is
        cancelled), the parts already started are stopped again before the error is raised."""
        try:
            await self._start(self.migrate if migrate is None else migrate)
        except BaseException:
            try:
                await self.stop()
            except Exception:  # the start's own error is the one to raise
                log.exception("stopping what a failed start had started failed too")
            raise

    async def _start(self, migrate: bool) -> None:
        self._store = await open_store(self.settings.database_url)
        self._store.sinks = self.sink_routes
        database = self._database = self._store.database
        if migrate:
            await upgrade(database)
        capabilities = database.capabilities
        self._queue = JobQueue(
            self._store, self.settings, clock=self.clock, notifier=self.notifier,
            telemetry=self.telemetry,
        )  # fmt: skip
        self._keys = KeyRing(self._store, self.clock, self.notifier)
        self._batches = BatchService(self._store.batches, self._queue, self.settings, self.clock)
        if capabilities.listen_notify:  # before the worker: its first wake-ups cross
            await self._start_broadcast()
        if capabilities.quiet_hint:
            running = self._queue.live.running
            database.hint_quiet(lambda: len(running) <= 1)
        if capabilities.shares_a_file:
            await self._recover_after_a_crash(database, migrated=migrate)
        if self.run_worker:
            self.worker = Worker(self._queue, build_upstreams(self.settings), self.settings.worker)
            await self.worker.start()
            sinks = Sinks(self.settings.sinks) if self.settings.sinks else None
            if sinks is not None:
                for name in sinks.configs:
                    self.checks[f"sink:{name}"] = sinks.check(name)
            self.sender = WebhookSender(
                self._store.webhooks, self.settings.webhooks, self.clock, self.notifier,
                self.telemetry, policy=self.address_policy, sinks=sinks,
            )  # fmt: skip
            await self.sender.start()
            providers = {u.name: batch_client(u) for u in self.settings.upstreams if u.runs_batches}
            self.batch_runner = BatchRunner(self._batches, providers)
            await self.batch_runner.start()
        await self._start_relays()
        await self._start_metrics()
        upstreams = ", ".join(f"{u.name} ({u.type})" for u in self.settings.upstreams) or "none"
        log.info("hookline started: database %s, upstreams: %s", database.dialect, upstreams)
        if self.settings.dev:
            log.warning(
                "development mode: webhooks may go to loopback and private addresses (%s); "
                "never use it in production", ", ".join(DEV_NETWORKS),
            )  # fmt: skip

    async def _start_metrics(self) -> None:
        """The gauges this process reads at scrape time; ``/metrics`` on a port of its own when
        configured (a worker process has no API port)."""
        metrics, live = self.telemetry.metrics, self.queue.live
        metrics.gauge("hookline_stream_subscribers", "Streams (SSE, WebSocket) watching, here.",
                      ("watching",), lambda: {(k,): n for k, n in live.subscribers().items()})  # fmt: skip
        if self.worker is not None:
            active = self.worker.running_per_upstream
            metrics.gauge("hookline_worker_jobs_in_flight", "Jobs this process's worker runs.",
                          ("upstream",), lambda: {(u,): n for u, n in active().items()})  # fmt: skip
        router = self.queue.router
        for name in router.circuits:
            circuit = functools.partial(router.state, name)
            self.checks[f"upstream:{name}"] = self.telemetry.upstream_check(name, circuit)
        metrics.gauge("hookline_upstream_circuit_open", "Upstreams whose circuit is open (1).",
                      ("upstream",), lambda: {(n,): float(router.state(n) == "open") for n in router.circuits})  # fmt: skip
        config = self.settings.metrics
        if metrics.enabled and config.port:
            self._metrics_server = await serve_metrics(config.host, config.port, self.scrape)

    async def scrape(self, accept: str = "") -> tuple[bytes, str]:
        """This process's metrics, and the database's gauges, as Prometheus exposition."""
        gauges = await self.store.insights.gauges(self.clock.now_ms())
        return self.telemetry.metrics.render(gauges, accept)

    async def _recover_after_a_crash(self, database: Database, *, migrated: bool) -> None:
        """The first process on a shared database file ends the leases left by processes that
        died, so their jobs and messages are taken again at once rather than after their lease
        time. Not on a schema other than this version's (started ``--no-migrate``): its tables
        may not be the ones this version knows, and the leases lapse by themselves anyway."""
        if not await database.join_processes():
            return
        try:
            if not migrated and (await schema_state(database))[0] != "current":
                return
            ended = await self.store.lapse_all_leases(self.clock.now_ms())
            if ended:
                log.info("recovering %d leases left by a process that stopped", ended)
        finally:
            database.shared()

    async def _start_broadcast(self) -> None:
        """Where the database carries notifications (PostgreSQL's LISTEN/NOTIFY), wake-ups and
        live output cross between the processes over them (hookline.live.broadcast)."""
        broadcast = Broadcast(self.settings.database_url, self.notifier, self.queue.live)
        self._relays.append(broadcast)
        self.checks["notify"] = broadcast.health
        await broadcast.start()

    async def _start_relays(self) -> None:
        """Between the processes sharing a database file, live output crosses over Unix sockets
        (hookline.live.relay); a worker's socket appears once the worker runs."""
        path = self.store.capabilities.file_path
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
        """Drain the worker, finish pending accepts, close the database. Safe to call twice, and
        after a start that failed part-way. A part that fails to stop does not keep the later
        ones running: all are stopped, then the first failure is raised."""
        failure: Exception | None = None
        for stopping in self._stops():
            try:
                await stopping
            except Exception as exc:
                if failure is None:
                    failure = exc
                else:
                    log.exception("stopping the gateway: another part failed too")
        if failure is not None:
            raise failure

    def _stops(self) -> Iterator[Coroutine[Any, Any, None]]:
        """Each started part's stop, in order; a part is forgotten once its stop has ended."""
        if self._metrics_server is not None:
            yield self._metrics_server.cleanup()
            self._metrics_server = None
        if self.worker is not None:
            yield self.worker.stop()
            self.worker = None
        if self.sender is not None:
            yield self.sender.stop()
            self.sender = None
        if self.batch_runner is not None:
            yield self.batch_runner.stop()
            self.batch_runner = None
        while self._relays:  # after the drain: a requeued job wakes the other workers
            yield self._relays[0].stop()
            del self._relays[0]
        if self._queue is not None:
            yield self._queue.close()
            self._queue = None
        if self._store is not None:
            yield self._store.close()
            self._store = self._database = None
        self.telemetry.tracing.shutdown()  # exports what it still holds


def _telemetry(settings: Settings, role: str) -> Telemetry:
    """Metrics (on by default) and tracing (off by default) as configured."""
    metrics = Metrics(role) if settings.metrics.enabled else NoMetrics(role)
    tracing = settings.tracing
    if not tracing.enabled:
        return Telemetry(metrics)
    return Telemetry(metrics, OpenTelemetry(
        service_name=tracing.service_name, role=role, otlp_endpoint=tracing.otlp_endpoint,
        sample_ratio=tracing.sample_ratio,
    ))  # fmt: skip
