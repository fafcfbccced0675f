"""Prometheus metrics: what this process counted, and what the database holds, at ``GET /metrics``.

Names follow Prometheus's conventions: the ``hookline_`` prefix, base units (``_seconds``),
``_total`` on counters. Every sample carries the process's ``role`` (``serve``, ``api`` or
``worker``): each process exports its own numbers, and Prometheus scrapes each (see
docs/operations.md). The gauges read from the database at scrape time (queue depth, the outbox,
endpoints, batches) are the same in every process: aggregate them with ``max``, not ``sum``.

The counts are taken on hot paths (every accept, every claim, every webhook attempt), so they are
plain numbers in dicts, turned into Prometheus families only when scraped: a labelled
``prometheus_client.Counter`` costs 1.5 µs an increment and a ``Histogram`` 0.7 µs an
observation (each takes a lock), these cost ~0.1 µs. Everything runs on the event loop's thread,
so no lock is needed. prometheus_client does the exposition (text and OpenMetrics).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from hookline._version import __version__

# Bucket bounds, in seconds.
ACCEPT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                300.0, 900.0, 3600.0)  # fmt: skip
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RUN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

Reader = Callable[[], dict[tuple[str, ...], float]]
_TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})


class JobFacts(Protocol):
    """What the metrics read of a job (:class:`hookline.jobs.Job` has it all)."""

    @property
    def operation(self) -> str: ...
    @property
    def upstream(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def created_at(self) -> int: ...
    @property
    def started_at(self) -> int | None: ...
    @property
    def finished_at(self) -> int | None: ...
    @property
    def run_after(self) -> int: ...


class Histogram:
    """Observations counted into buckets: ``counts[i]`` holds those in ``(bounds[i-1],
    bounds[i]]``, the last one those above every bound."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip([*self.bounds, float("inf")], self.counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return buckets


class Histograms:
    """One :class:`Histogram` per label values."""

    __slots__ = ("bounds", "by_labels")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.by_labels: dict[tuple[str, ...], Histogram] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        histogram = self.by_labels.get(labels)
        if histogram is None:
            histogram = self.by_labels[labels] = Histogram(self.bounds)
        histogram.observe(value)


@dataclasses.dataclass
class DatabaseGauges:
    """What the database holds, read at scrape time (the same in every process)."""

    queued: dict[str, tuple[int, int | None]]  # upstream -> (jobs queued, oldest created_at)
    running: dict[str, int]  # upstream -> jobs running, across all processes
    outbox_pending: int
    outbox_oldest: int | None  # created_at of the oldest pending message
    endpoints_failing: int  # enabled, and failing without a success since
    endpoints_disabled: int  # disabled: by the circuit breaker, a 410 or by hand
    batches: dict[str, int]  # status -> batches
    now: int  # when read, epoch ms


class Metrics:
    """This process's metrics. The hooks (``accepted``, ``job_changed``, ``retried``,
    ``upstream_call``, ``delivery_attempt``) are called where the thing happens; :meth:`render`
    gives the exposition."""

    enabled = True

    def __init__(self, role: str) -> None:
        self.role = role
        self.accepted_total: dict[tuple[str, str], int] = {}
        self.finished_total: dict[tuple[str, str, str], int] = {}
        self.retries_total: dict[tuple[str, str], int] = {}
        self.upstream_calls_total: dict[tuple[str, str, str], int] = {}
        self.delivery_attempts_total: dict[tuple[str, str], int] = {}
        self.deliveries_total: dict[tuple[str, str], int] = {}
        self.accept_seconds = Histogram(ACCEPT_BUCKETS)
        self.queue_wait = Histograms(WAIT_BUCKETS)
        self.ttft = Histograms(TTFT_BUCKETS)
        self.run_seconds = Histograms(RUN_BUCKETS)
        self.delivery_latency = Histograms(WAIT_BUCKETS)
        # Read at scrape time, by name: (help, label names, a callable giving values by labels).
        self.live_gauges: dict[str, tuple[str, tuple[str, ...], Reader]] = {}
        self._database: DatabaseGauges | None = None
        self._registry = CollectorRegistry(auto_describe=False)
        collectors: list[Collector] = [self._Families(self), PlatformCollector(registry=None)]
        # (GCCollector insists on registering itself: in a registry of its own, then wrapped.)
        collectors += [ProcessCollector(registry=None), GCCollector(CollectorRegistry())]
        for collector in collectors:
            self._registry.register(_WithRole(collector, role))

    # --- hooks (hot paths: keep them cheap)

    def accepted(self, job: JobFacts, seconds: float | None) -> None:
        """A job was accepted (written) in ``seconds`` (None: a batch's item, written with many);
        one accepted already running waited 0 s."""
        key = (job.operation, job.upstream)
        self.accepted_total[key] = self.accepted_total.get(key, 0) + 1
        if seconds is not None:
            self.accept_seconds.observe(seconds)
        if job.status == "running":
            self.queue_wait.observe((job.upstream,), 0.0)

    def job_changed(self, job: JobFacts) -> None:
        """A job's status changed (a claim, an ending, a retry): its wait or its run is over."""
        status = job.status
        if status == "running":
            if job.started_at is not None:
                waited = job.started_at - max(job.run_after, job.created_at)
                self.queue_wait.observe((job.upstream,), max(0, waited) / 1000)
        elif status in _TERMINAL and job.operation != "batch":  # a batch's anchor is no job
            key = (job.operation, job.upstream, status)
            self.finished_total[key] = self.finished_total.get(key, 0) + 1
            if job.started_at is not None and job.finished_at is not None:
                ran = max(0, job.finished_at - job.started_at) / 1000
                self.run_seconds.observe((job.upstream, status), ran)

    def retried(self, upstream: str, reason: str) -> None:
        """A failed attempt will be tried again (``reason``: the failure's type)."""
        key = (upstream, reason)
        self.retries_total[key] = self.retries_total.get(key, 0) + 1

    def upstream_call(
        self, upstream: str, operation: str, status: str, first_token_after: float | None
    ) -> None:
        """An upstream call ended (``status``: ``ok``, the HTTP status, or the error's type);
        ``first_token_after``: seconds from the job's accept to its first output."""
        key = (upstream, operation, status)
        self.upstream_calls_total[key] = self.upstream_calls_total.get(key, 0) + 1
        if first_token_after is not None:
            self.ttft.observe((upstream,), first_token_after)

    def delivery_attempt(
        self,
        kind: str,
        status_code: int | None,
        succeeded: bool,
        retrying: bool,
        since_event: float,
    ) -> None:
        """One attempt to deliver a message (``kind``: ``webhook`` or a sink's type), with the
        HTTP status it got (None: no answer, or a sink, which answers no status: ``ok`` or
        ``error``). Unless ``retrying``, it settled the message: ``delivered``
        (``since_event``: seconds from the event to now) or a dead letter."""
        sink_status = "ok" if succeeded else "error"
        key = (kind, str(status_code) if status_code is not None else sink_status)
        self.delivery_attempts_total[key] = self.delivery_attempts_total.get(key, 0) + 1
        if succeeded:
            settled = (kind, "delivered")
            self.delivery_latency.observe((kind,), since_event)
        elif not retrying:
            settled = (kind, "dead")
        else:
            return
        self.deliveries_total[settled] = self.deliveries_total.get(settled, 0) + 1

    # --- at scrape time

    def gauge(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...],
        read: Reader,
    ) -> None:
        """Export ``name``, a gauge this process reads at scrape time with ``read``."""
        self.live_gauges[name] = (documentation, labels, read)

    def render(self, database: DatabaseGauges | None, accept: str = "") -> tuple[bytes, str]:
        """The exposition (``accept``: the scraper's Accept header) and its content type."""
        self._database = database
        encoder, content_type = choose_encoder(accept)
        try:
            return encoder(self._registry), content_type
        finally:
            self._database = None

    class _Families:
        def __init__(self, metrics: Metrics) -> None:
            self.metrics = metrics

        def collect(self) -> Iterator[Metric]:
            yield from _families(self.metrics)


def _counter(
    name: str, documentation: str, labels: Sequence[str], values: Mapping[Any, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(key, value)
    return family


def _histograms(
    name: str, documentation: str, labels: Sequence[str], histograms: Histograms
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for key, histogram in sorted(histograms.by_labels.items()):
        family.add_metric(key, histogram.cumulative(), histogram.sum)
    return family


def _gauge(
    name: str,
    documentation: str,
    labels: Sequence[str],
    values: Iterable[tuple[tuple[str, ...], float]],
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for key, value in values:
        family.add_metric(key, value)
    return family


def _families(m: Metrics) -> Iterator[Metric]:
    info = GaugeMetricFamily("hookline_build_info", "The running hookline.", labels=["version"])
    info.add_metric([__version__], 1)
    yield info
    yield _counter("hookline_jobs_accepted", "Jobs accepted (written to the queue).",
                   ["operation", "upstream"], dict(m.accepted_total))  # fmt: skip
    yield _counter("hookline_jobs_finished", "Jobs that ended, by their final status.",
                   ["operation", "upstream", "status"], dict(m.finished_total))  # fmt: skip
    yield _counter("hookline_job_retries", "Failed attempts queued to be tried again.",
                   ["upstream", "reason"], dict(m.retries_total))  # fmt: skip
    yield _counter("hookline_upstream_requests", "Calls to upstreams, by how they ended.",
                   ["upstream", "operation", "status"], dict(m.upstream_calls_total))  # fmt: skip
    yield _counter("hookline_delivery_attempts", "Attempts to deliver a message.",
                   ["kind", "status"], dict(m.delivery_attempts_total))  # fmt: skip
    yield _counter("hookline_deliveries", "Messages settled: delivered, or dead letters.",
                   ["kind", "outcome"], dict(m.deliveries_total))  # fmt: skip
    accept = HistogramMetricFamily("hookline_accept_duration_seconds",
                                   "Time to accept a job durably (written and committed).")  # fmt: skip
    accept.add_metric([], m.accept_seconds.cumulative(), m.accept_seconds.sum)
    yield accept
    yield _histograms("hookline_queue_wait_seconds", "Time a job waited in the queue before an attempt started.",
                      ["upstream"], m.queue_wait)  # fmt: skip
    yield _histograms("hookline_time_to_first_token_seconds", "Time from a job's accept to its first output.",
                      ["upstream"], m.ttft)  # fmt: skip
    yield _histograms("hookline_run_duration_seconds", "Time a job's last attempt ran, by the job's final status.",
                      ["upstream", "status"], m.run_seconds)  # fmt: skip
    yield _histograms("hookline_delivery_latency_seconds", "Time from an event to its message's delivery.",
                      ["kind"], m.delivery_latency)  # fmt: skip
    for name, (documentation, labels, read) in m.live_gauges.items():
        yield _gauge(name, documentation, labels, read().items())
    if m._database is not None:
        yield from _database_families(m._database)


def _age(now: int, since: int | None) -> float:
    return 0.0 if since is None else max(0, now - since) / 1000


def _database_families(db: DatabaseGauges) -> Iterator[Metric]:
    yield _gauge("hookline_queue_depth", "Jobs queued (in the database), per upstream.",
                 ["upstream"], (((u,), n) for u, (n, _) in sorted(db.queued.items())))  # fmt: skip
    yield _gauge("hookline_queue_oldest_age_seconds", "Age of the oldest queued job, per upstream.",
                 ["upstream"], (((u,), _age(db.now, at)) for u, (_, at) in sorted(db.queued.items())))  # fmt: skip
    yield _gauge("hookline_jobs_running", "Jobs running (in the database, across all workers).",
                 ["upstream"], (((u,), n) for u, n in sorted(db.running.items())))  # fmt: skip
    yield _gauge("hookline_outbox_depth", "Messages waiting to be delivered.", [],
                 [((), db.outbox_pending)])  # fmt: skip
    yield _gauge("hookline_outbox_oldest_age_seconds", "Age of the oldest message waiting.", [],
                 [((), _age(db.now, db.outbox_oldest))])  # fmt: skip
    yield _gauge("hookline_webhook_endpoints_failing", "Enabled endpoints failing without a success since.",
                 [], [((), db.endpoints_failing)])  # fmt: skip
    yield _gauge("hookline_webhook_circuits_open", "Endpoints disabled (circuit breaker, 410 Gone, or by hand).",
                 [], [((), db.endpoints_disabled)])  # fmt: skip
    yield _gauge("hookline_batches", "Batches, by status.", ["status"],
                 (((s,), n) for s, n in sorted(db.batches.items())))  # fmt: skip


class _WithRole:
    """A collector whose every sample also carries ``role``."""

    def __init__(self, inner: Collector, role: str) -> None:
        self.inner = inner
        self.role = role

    def collect(self) -> Iterator[Metric]:
        for family in self.inner.collect():
            family.samples = [
                sample._replace(labels={**sample.labels, "role": self.role})
                for sample in family.samples
            ]
            yield family


class NoMetrics(Metrics):
    """Metrics turned off (``[metrics] enabled = false``): the hooks do nothing."""

    enabled = False

    def accepted(self, job: JobFacts, seconds: float | None) -> None:
        pass

    def job_changed(self, job: JobFacts) -> None:
        pass

    def retried(self, upstream: str, reason: str) -> None:
        pass

    def upstream_call(
        self, upstream: str, operation: str, status: str, first_token_after: float | None
    ) -> None:
        pass

    def delivery_attempt(
        self,
        kind: str,
        status_code: int | None,
        succeeded: bool,
        retrying: bool,
        since_event: float,
    ) -> None:
        pass


Scrape = Callable[[str], Awaitable[tuple[bytes, str]]]


async def serve_metrics(host: str, port: int, scrape: Scrape) -> web.AppRunner:
    """Serve ``GET /metrics`` on a port of its own (``scrape``: the Accept header -> the
    exposition and its content type). Stop it with ``await runner.cleanup()``."""

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = await scrape(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
