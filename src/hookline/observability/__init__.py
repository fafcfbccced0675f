"""What an operator sees of a running hookline: Prometheus metrics (:mod:`.metrics`),
OpenTelemetry traces and GenAI metrics (:mod:`.tracing`), structured logs (:mod:`.logs`).

This package sits just above the foundation: the store, the queue, the worker and the deliverers
report to it, so it imports none of them and takes what it measures as plain values (a job is
anything with a job's attributes). :class:`Telemetry` is what those parts are handed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from hookline.observability import logs
from hookline.observability.health import Check, HealthCheck, UpstreamHealth
from hookline.observability.metrics import DatabaseGauges, JobFacts, Metrics, NoMetrics
from hookline.observability.tracing import OpenTelemetry, Tracing

_TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})

__all__ = [
    "CallFacts",
    "Check",
    "DatabaseGauges",
    "HealthCheck",
    "MessageFacts",
    "Metrics",
    "NoMetrics",
    "OpenTelemetry",
    "OutcomeFacts",
    "Telemetry",
    "Tracing",
    "UpstreamCall",
]


class CallFacts(JobFacts, Protocol):
    """What telemetry reads of a job (:class:`hookline.jobs.Job` has it all)."""

    @property
    def id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def attempts(self) -> int: ...
    @property
    def error(self) -> Mapping[str, Any] | None: ...
    @property
    def traceparent(self) -> str | None: ...


class MessageFacts(Protocol):
    """What telemetry reads of an outbox message (:class:`hookline.deliveries.Delivery`)."""

    @property
    def id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def job_id(self) -> str | None: ...
    @property
    def endpoint_id(self) -> str | None: ...
    @property
    def event_type(self) -> str: ...
    @property
    def attempts(self) -> int: ...
    @property
    def created_at(self) -> int: ...


class OutcomeFacts(Protocol):
    """What telemetry reads of a delivery attempt's outcome."""

    @property
    def status_code(self) -> int | None: ...
    @property
    def succeeded(self) -> bool: ...
    @property
    def next_attempt_at(self) -> int | None: ...


class Telemetry:
    """A process's metrics, tracing (each may be off) and structured logs: the parts that do
    something worth seeing call its hooks, each a line where the thing happens."""

    def __init__(self, metrics: Metrics | None = None, tracing: Tracing | None = None) -> None:
        self.metrics = metrics if metrics is not None else NoMetrics("serve")
        self.tracing = tracing if tracing is not None else Tracing()
        self.upstreams: dict[str, UpstreamHealth] = {}  # what this process's calls saw

    def upstream_check(
        self, upstream: str, circuit: Callable[[], str] | None = None
    ) -> HealthCheck:
        """The health check of ``upstream``: by its circuit breaker's state (``circuit``), else
        failing after calls from here failed in a row."""
        health = self.upstreams.setdefault(upstream, UpstreamHealth())

        async def check() -> Check:
            return health.check(circuit() if circuit is not None else None)

        return check

    def accepted(self, job: CallFacts, seconds: float | None) -> None:
        """A job was written to the queue, in ``seconds`` (None: a batch's item)."""
        self.metrics.accepted(job, seconds)
        logs.job_accepted(job)

    def job_changed(self, job: CallFacts) -> None:
        """A job's status changed (a claim, an ending, a retry), as committed."""
        self.metrics.job_changed(job)
        if job.status in _TERMINAL and job.operation != "batch":
            ran = None
            if job.started_at is not None and job.finished_at is not None:
                ran = job.finished_at - job.started_at
            logs.job_ended(job, job.status, job.error, ran)

    def retried(self, job: CallFacts, reason: str, delay: float) -> None:
        """A failed attempt (``reason``: its type) will be tried again in ``delay`` seconds."""
        self.metrics.retried(job.upstream, reason)
        logs.job_retrying(job, reason, delay)

    def delivery_attempt(
        self, kind: str, message: MessageFacts, outcome: OutcomeFacts, now: int
    ) -> None:
        """One attempt to deliver ``message`` (``kind``: ``webhook`` or a sink's type)."""
        retrying = outcome.next_attempt_at is not None
        since_event = (now - message.created_at) / 1000
        status = outcome.status_code
        self.metrics.delivery_attempt(kind, status, outcome.succeeded, retrying, since_event)
        settled = "delivered" if outcome.succeeded else (None if retrying else "dead")
        logs.delivery_attempted(kind, {
            "delivery_id": message.id, "tenant": message.tenant, "job_id": message.job_id,
            "endpoint_id": message.endpoint_id, "event_type": message.event_type,
            "attempt": message.attempts + 1,
        }, status, settled)  # fmt: skip

    def upstream_call(
        self, job: CallFacts, provider: str, base_url: str | None, body: Mapping[str, Any]
    ) -> UpstreamCall:
        """An upstream call starts now (``provider``: the upstream's type)."""
        return UpstreamCall(self, job, provider, base_url, body)


class UpstreamCall:
    """One attempt's call to its upstream, from its start to :meth:`ended`."""

    __slots__ = ("call", "created_at", "span", "started", "telemetry")

    def __init__(
        self,
        telemetry: Telemetry,
        job: CallFacts,
        provider: str,
        base_url: str | None,
        body: Mapping[str, Any],
    ) -> None:
        self.telemetry = telemetry
        self.started = time.time()
        self.created_at = job.created_at
        self.call: dict[str, Any] = {"upstream": job.upstream, "operation": job.operation}
        self.span = None
        tracing = telemetry.tracing
        if tracing.enabled:
            model = body.get("model") or job.model  # (the name the upstream is asked for)
            self.call.update(
                model=model, provider=provider, base_url=base_url, job_id=job.id,
                attempt=job.attempts, started_ms=int(self.started * 1000), body=body,
            )  # fmt: skip
            queued_since = max(job.run_after, job.created_at)
            self.span = tracing.upstream_call(self.call, job.traceparent, queued_since)

    def ended(
        self,
        status: str,
        first_output_at: float | None,
        output: Mapping[str, Any] | None = None,
    ) -> None:
        """The call ended: ``ok`` with its ``output``, or failed (``status``: the HTTP status,
        the error's type, ``cancelled``); ``first_output_at``: when its first output came
        (``time.time()``), if any did."""
        call = self.call
        upstream = self.telemetry.upstreams.get(call["upstream"])
        if upstream is not None:
            upstream.record(status)
        first_token_after = None
        if first_output_at is not None:
            first_token_after = max(0.0, first_output_at - self.created_at / 1000)
        self.telemetry.metrics.upstream_call(
            call["upstream"], call["operation"], status, first_token_after
        )
        tracing = self.telemetry.tracing
        if tracing.enabled:
            first_chunk = None if first_output_at is None else first_output_at - self.started
            seconds = time.time() - self.started
            error = None if status == "ok" else status
            tracing.upstream_ended(self.span, call, seconds, first_chunk, output, error)
