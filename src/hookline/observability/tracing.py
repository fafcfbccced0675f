"""OpenTelemetry traces and GenAI metrics, following the GenAI semantic conventions.

Off by default, and an optional extra (``pip install 'hookline[otel]'``): :class:`Tracing` does
nothing, costs nothing and imports nothing of OpenTelemetry. Turned on (``[tracing] enabled``),
:class:`OpenTelemetry`:

- starts a SERVER span per API request, continuing the caller's ``traceparent``;
- gives each accepted job the W3C trace context of the request that submitted it (stored with
  the job, so it crosses the queue to whichever worker runs it);
- per upstream call, a CLIENT span ``{gen_ai.operation.name} {gen_ai.request.model}`` with the
  ``gen_ai.*`` attributes, preceded by a span for the job's wait in the queue, and the metrics
  ``gen_ai.client.operation.duration``, ``gen_ai.client.token.usage`` and
  ``gen_ai.client.operation.time_to_first_chunk``;
- per webhook attempt, a CLIENT span whose context goes out in the message's ``traceparent``
  header, so one trace shows submit → queue → upstream → delivery.

Spans and metrics are exported over OTLP/HTTP when an endpoint is configured (or the standard
``OTEL_EXPORTER_OTLP_*`` variables name one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

from hookline._version import __version__

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider

log = logging.getLogger("hookline.tracing")

# hookline's operations -> gen_ai.operation.name (well-known values where there is one).
GENAI_OPERATIONS = {
    "chat.completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "images.generations": "generate_content",
}
DURATION_BUCKETS = [
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
]  # fmt: skip  (the conventions' advice)
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864]  # fmt: skip


class Tracing:
    """Tracing turned off: every hook returns at once."""

    enabled = False

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """The app, wrapped so that each request runs in a span continuing the caller's trace."""
        return app

    def current_traceparent(self) -> str | None:
        """The W3C ``traceparent`` of the span running now (the submitting request's)."""
        return None

    def upstream_call(
        self, call: Mapping[str, Any], traceparent: str | None, queued_since_ms: int
    ) -> Span | None:
        """Start the span of an upstream call (see :meth:`OpenTelemetry.upstream_call`)."""
        return None

    def upstream_ended(
        self,
        span: Span | None,
        call: Mapping[str, Any],
        seconds: float,
        first_chunk_after: float | None,
        output: Mapping[str, Any] | None,
        error: str | None,
    ) -> None:
        """End it, with what the answer said, and record the GenAI metrics."""

    def delivery_started(
        self, traceparent: str | None, url: str, headers: dict[str, str], sink: str | None = None
    ) -> Span | None:
        """A delivery attempt starts (a webhook's POST to ``url``, or a message handed to the data
        sink ``sink`` at ``url``): its span (a child of the job's trace), whose context goes into
        ``headers``. Off, the job's own ``traceparent`` goes there, if it has one."""
        if traceparent:
            headers["traceparent"] = traceparent
        return None

    def delivery_ended(self, span: Span | None, status_code: int | None, error: str | None) -> None:
        """What the attempt got."""

    def shutdown(self) -> None:
        """Export what is still buffered, and stop."""


class OpenTelemetry(Tracing):
    """Tracing on. ``tracer_provider`` / ``meter_provider``: the SDK's providers to use (tests
    give ones with in-memory exporters); by default they are built here, exporting over OTLP."""

    enabled = True

    def __init__(
        self,
        *,
        service_name: str = "hookline",
        role: str = "serve",
        otlp_endpoint: str | None = None,
        sample_ratio: float = 1.0,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        try:
            from opentelemetry import context, trace
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:  # pragma: no cover (the extra is installed in development)
            raise RuntimeError(
                "tracing needs the otel extra: pip install 'hookline[otel]'"
            ) from exc
        self._owned: list[Any] = []
        if tracer_provider is None or meter_provider is None:
            built_traces, built_metrics = _providers(
                service_name, role, otlp_endpoint, sample_ratio
            )
            if tracer_provider is None:
                tracer_provider = built_traces
                self._owned.append(built_traces)
            if meter_provider is None:
                meter_provider = built_metrics
                self._owned.append(built_metrics)
        self._context = context
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self.tracer = tracer_provider.get_tracer("hookline", __version__)
        meter = meter_provider.get_meter("hookline", __version__)
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s",
            description="GenAI operation duration",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )  # fmt: skip
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Number of input and output tokens used",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )  # fmt: skip
        self.first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk", unit="s",
            description="Time to receive the first chunk of a streamed answer",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )  # fmt: skip
        self._servers: dict[str, tuple[str, int] | None] = {}

    # --- the API

    def middleware(self, app: ASGIApp) -> ASGIApp:
        return _ServerSpans(app, self)

    def current_traceparent(self) -> str | None:
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier.get("traceparent")

    def _parent(self, traceparent: str | None) -> Any:
        return self._propagator.extract({"traceparent": traceparent} if traceparent else {})

    # --- the worker

    def upstream_call(
        self, call: Mapping[str, Any], traceparent: str | None, queued_since_ms: int
    ) -> Span | None:
        """``call``: ``operation``, ``model``, ``provider``, ``upstream``, ``base_url``,
        ``job_id``, ``attempt``, ``started_ms`` and the request ``body``."""
        parent = self._parent(traceparent)
        kind = self._trace.SpanKind
        started_ns = int(call["started_ms"]) * 1_000_000
        wait = self.tracer.start_span(
            f"queued {call['upstream']}", context=parent, kind=kind.INTERNAL,
            start_time=queued_since_ms * 1_000_000,
            attributes={"hookline.job.id": call["job_id"], "hookline.upstream": call["upstream"]},
        )  # fmt: skip
        wait.end(end_time=max(started_ns, queued_since_ms * 1_000_000))
        operation = GENAI_OPERATIONS.get(call["operation"], call["operation"])
        attributes = self._request_attributes(call, operation)
        attributes["hookline.job.id"] = call["job_id"]
        attributes["hookline.job.attempt"] = call["attempt"]
        attributes["hookline.upstream"] = call["upstream"]
        return self.tracer.start_span(
            f"{operation} {call['model']}", context=parent, kind=kind.CLIENT,
            attributes=attributes, start_time=started_ns,
        )  # fmt: skip

    def _request_attributes(self, call: Mapping[str, Any], operation: str) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": call["provider"],
            "gen_ai.request.model": call["model"],
        }
        server = self._server(call.get("base_url"))
        if server is not None:
            attributes["server.address"], attributes["server.port"] = server
        body = call.get("body") or {}
        for name, key in (("max_tokens", "max_tokens"), ("temperature", "temperature"),
                          ("top_p", "top_p"), ("seed", "seed")):  # fmt: skip
            value = body.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                attributes[f"gen_ai.request.{name}"] = value
        return attributes

    def _server(self, base_url: str | None) -> tuple[str, int] | None:
        if not base_url:
            return None
        if base_url not in self._servers:
            parts = urllib.parse.urlsplit(base_url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            self._servers[base_url] = (parts.hostname, port) if parts.hostname else None
        return self._servers[base_url]

    def upstream_ended(
        self,
        span: Span | None,
        call: Mapping[str, Any],
        seconds: float,
        first_chunk_after: float | None,
        output: Mapping[str, Any] | None,
        error: str | None,
    ) -> None:
        operation = GENAI_OPERATIONS.get(call["operation"], call["operation"])
        metric_attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": call["provider"],
            "gen_ai.request.model": call["model"],
        }
        server = self._server(call.get("base_url"))
        if server is not None:
            metric_attributes["server.address"], metric_attributes["server.port"] = server
        response = _response_attributes(output) if output is not None else {}
        if "gen_ai.response.model" in response:
            metric_attributes["gen_ai.response.model"] = response["gen_ai.response.model"]
        if error is not None:
            metric_attributes["error.type"] = error
        if span is not None:
            span.set_attributes(response)
            if error is not None:
                span.set_attribute("error.type", error)
                span.set_status(self._trace.StatusCode.ERROR, error)
            span.end()
        self.duration.record(seconds, metric_attributes)
        if first_chunk_after is not None:
            self.first_chunk.record(first_chunk_after, metric_attributes)
        for token_type, key in (("input", "gen_ai.usage.input_tokens"),
                                ("output", "gen_ai.usage.output_tokens")):  # fmt: skip
            if key in response:
                self.tokens.record(
                    response[key], {**metric_attributes, "gen_ai.token.type": token_type}
                )

    # --- the webhook sender

    def delivery_started(
        self, traceparent: str | None, url: str, headers: dict[str, str], sink: str | None = None
    ) -> Span | None:
        parts = urllib.parse.urlsplit(url)
        attributes: dict[str, Any] = {}
        if parts.hostname:
            attributes["server.address"] = parts.hostname
            default = {"https": 443, "http": 80}.get(parts.scheme)
            if parts.port or default:
                attributes["server.port"] = parts.port or default
        if sink is None:
            name, kind = "POST", self._trace.SpanKind.CLIENT
            attributes.update({"http.request.method": "POST", "url.full": _without_query(url)})
        else:  # (a broker's URL may hold credentials: only its host is kept)
            name, kind = f"publish {sink}", self._trace.SpanKind.PRODUCER
            attributes.update({"messaging.operation.type": "send", "hookline.sink": sink,
                               "messaging.system": parts.scheme or "unknown"})  # fmt: skip
        span = self.tracer.start_span(
            name, context=self._parent(traceparent), kind=kind, attributes=attributes
        )
        self._propagator.inject(headers, context=self._trace.set_span_in_context(span))
        return span

    def delivery_ended(self, span: Span | None, status_code: int | None, error: str | None) -> None:
        if span is None:
            return
        if status_code is not None:
            span.set_attribute("http.response.status_code", status_code)
        if error is not None:
            span.set_attribute("error.type", str(status_code) if status_code else "error")
            span.set_status(self._trace.StatusCode.ERROR, error)
        span.end()

    def shutdown(self) -> None:
        owned, self._owned = self._owned, []
        for provider in owned:
            with contextlib.suppress(Exception):
                provider.shutdown()


def _response_attributes(output: Mapping[str, Any]) -> dict[str, Any]:
    """The ``gen_ai.response.*`` and ``gen_ai.usage.*`` attributes of an OpenAI-shaped answer."""
    attributes: dict[str, Any] = {}
    if isinstance(output.get("model"), str):
        attributes["gen_ai.response.model"] = output["model"]
    if isinstance(output.get("id"), str):
        attributes["gen_ai.response.id"] = output["id"]
    usage = output.get("usage")
    if isinstance(usage, Mapping):
        for key, name in (("prompt_tokens", "input"), ("completion_tokens", "output"),
                          ("input_tokens", "input"), ("output_tokens", "output")):  # fmt: skip
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                attributes[f"gen_ai.usage.{name}_tokens"] = value
    choices = output.get("choices")
    if isinstance(choices, list):
        reasons = [c["finish_reason"] for c in choices
                   if isinstance(c, Mapping) and isinstance(c.get("finish_reason"), str)]  # fmt: skip
        if reasons:
            attributes["gen_ai.response.finish_reasons"] = reasons
    return attributes


def _without_query(url: str) -> str:
    """A URL as a span may show it: a query may carry a token, and user info a password."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _providers(
    service_name: str, role: str, endpoint: str | None, sample_ratio: float
) -> tuple[Any, Any]:
    """The SDK's tracer and meter providers, exporting over OTLP/HTTP when an endpoint is known."""
    from opentelemetry.sdk.metrics import MeterProvider as SDKMeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create({"service.name": service_name, "hookline.role": role})
    tracer_provider = SDKTracerProvider(
        resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio))
    )
    readers = []
    exporting = endpoint or any(
        os.environ.get(name)
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    if exporting:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        base = endpoint.rstrip("/") if endpoint else None
        traces = OTLPSpanExporter(endpoint=f"{base}/v1/traces" if base else None)
        tracer_provider.add_span_processor(BatchSpanProcessor(traces))
        metrics = OTLPMetricExporter(endpoint=f"{base}/v1/metrics" if base else None)
        readers.append(PeriodicExportingMetricReader(metrics))
    else:
        log.warning("tracing is on but no OTLP endpoint is configured: spans are not exported")
    return tracer_provider, SDKMeterProvider(resource=resource, metric_readers=readers)


class _ServerSpans:
    """Each HTTP request in a SERVER span (continuing the caller's ``traceparent``), the span
    current while the app runs, so that a job submitted carries its context."""

    def __init__(self, app: ASGIApp, tracing: OpenTelemetry) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        traceparent = None
        for name, value in scope["headers"]:
            if name == b"traceparent":
                traceparent = value.decode("latin-1")
                break
        tracing = self.tracing
        method = scope.get("method", "GET")
        span = tracing.tracer.start_span(
            method, context=tracing._parent(traceparent), kind=tracing._trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope.get("path", "")},
        )  # fmt: skip
        token = tracing._context.attach(tracing._trace.set_span_in_context(span))
        status = 500

        async def sending(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(tracing._trace.StatusCode.ERROR)
            tracing._context.detach(token)
            span.end()
