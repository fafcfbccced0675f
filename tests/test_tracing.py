"""OpenTelemetry, with the SDK's in-memory exporters: one trace from the submitting request's
``traceparent`` through the queue, one CLIENT span per upstream attempt with the GenAI
attributes, to the webhook's ``traceparent`` header; and the GenAI metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from hookline.config import SinkConfig, TracingConfig
from hookline.observability import Metrics, OpenTelemetry, Telemetry
from tests.conftest import gateway_settings, serve, wait_for_status
from tests.scripted_upstream import Reply, ScriptedUpstream, Status
from tests.webhook_receiver import WebhookReceiver

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Recorded:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.metrics = InMemoryMetricReader()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        meter_provider = MeterProvider(metric_readers=[self.metrics])
        self.providers = (tracer_provider, meter_provider)
        self.telemetry = Telemetry(
            Metrics("serve"),
            OpenTelemetry(tracer_provider=tracer_provider, meter_provider=meter_provider),
        )

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def metric_points(self) -> dict[str, list[Any]]:
        data = self.metrics.get_metrics_data()
        assert data is not None
        points: dict[str, list[Any]] = {}
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    points.setdefault(metric.name, []).extend(metric.data.data_points)
        return points


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    recorded = Recorded()
    yield recorded
    for provider in recorded.providers:
        provider.shutdown()


def chat(model: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "hello there"}]
    return {"operation": "chat.completions", "model": model,
            "input": {"messages": messages, "max_tokens": 16}, **extra}  # fmt: skip


async def test_one_trace_from_submit_to_webhook(
    database_url: str,
    upstream: ScriptedUpstream,
    receiver: WebhookReceiver,
    recorded: Recorded,
) -> None:
    upstream.script("flaky", Status(503), Reply(text="all good here"))
    settings = gateway_settings(
        database_url, upstream.base_url, tracing=TracingConfig(enabled=True)
    )
    async with serve(settings, telemetry=recorded.telemetry) as live:
        traceparent = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
        body = chat("flaky", webhook={"url": receiver.url()})
        answer = await live.client.post("/v1/jobs", json=body, headers={"traceparent": traceparent})
        job = await wait_for_status(live.client, answer.json()["id"], {"succeeded"})
        [message] = await receiver.wait_for("/hook", 1)

    spans = recorded.finished()
    in_trace = [s for s in spans if format(s.context.trace_id, "032x") == TRACE_ID]
    [server] = [s for s in in_trace if s.kind is SpanKind.SERVER]
    assert server.name == "POST /v1/jobs"
    assert server.parent is not None and format(server.parent.span_id, "016x") == CALLER_SPAN
    calls = sorted((s for s in in_trace if s.name == "chat flaky"), key=lambda s: s.start_time or 0)
    assert len(calls) == 2  # one span per attempt, both children of the submitting request
    assert all(s.kind is SpanKind.CLIENT for s in calls)
    assert all(s.parent is not None and s.parent.span_id == server.context.span_id for s in calls)
    failed, succeeded = calls
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None and failed.attributes["error.type"] == "503"
    attributes = dict(succeeded.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == "flaky"
    assert attributes["gen_ai.response.model"] == "flaky"
    assert attributes["gen_ai.response.id"] == "scripted-1"
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["gen_ai.usage.input_tokens"] == 5
    assert attributes["gen_ai.usage.output_tokens"] == 4  # the scripted stream's four chunks
    assert attributes["gen_ai.request.max_tokens"] == 16
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["hookline.job.id"] == job["id"]
    assert attributes["hookline.job.attempt"] == 2
    assert succeeded.status.status_code is not StatusCode.ERROR
    waits = [s for s in in_trace if s.name == "queued scripted"]
    assert len(waits) == 2
    # The webhook went out in a span of the same trace, whose context the receiver got.
    [post] = [s for s in in_trace if s.name == "POST" and s.kind is SpanKind.CLIENT]
    assert message.headers["traceparent"] == (
        f"00-{TRACE_ID}-{format(post.context.span_id, '016x')}-01"
    )
    assert post.attributes is not None and post.attributes["http.response.status_code"] == 200

    points = recorded.metric_points()
    durations = points["gen_ai.client.operation.duration"]
    assert sum(p.count for p in durations) == 2
    assert {p.attributes.get("error.type") for p in durations} == {"503", None}
    tokens = {p.attributes["gen_ai.token.type"]: p for p in points["gen_ai.client.token.usage"]}
    assert tokens["input"].sum == 5 and tokens["input"].count == 1
    assert tokens["output"].count == 1
    assert sum(p.count for p in points["gen_ai.client.operation.time_to_first_chunk"]) == 1


async def test_without_a_caller_trace_a_job_starts_its_own(
    database_url: str, upstream: ScriptedUpstream, recorded: Recorded
) -> None:
    settings = gateway_settings(
        database_url, upstream.base_url, tracing=TracingConfig(enabled=True)
    )
    async with serve(settings, telemetry=recorded.telemetry) as live:
        answer = await live.client.post("/v1/jobs", json=chat("m"))
        await wait_for_status(live.client, answer.json()["id"], {"succeeded"})
    spans = recorded.finished()
    [server] = [s for s in spans if s.name == "POST /v1/jobs"]
    assert server.parent is None
    [call] = [s for s in spans if s.name == "chat m"]
    assert call.context.trace_id == server.context.trace_id


async def test_tracing_off_keeps_no_trace_context(
    database_url: str, upstream: ScriptedUpstream, receiver: WebhookReceiver
) -> None:
    async with serve(gateway_settings(database_url, upstream.base_url)) as live:
        headers = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"}
        body = chat("m", webhook={"url": receiver.url()})
        answer = await live.client.post("/v1/jobs", json=body, headers=headers)
        await wait_for_status(live.client, answer.json()["id"], {"succeeded"})
        [message] = await receiver.wait_for("/hook", 1)
        job = await live.gateway.store.get_job(answer.json()["id"])
    assert job is not None and job.traceparent is None
    assert "traceparent" not in message.headers


async def test_a_sinks_messages_carry_the_trace_too(
    database_url: str, upstream: ScriptedUpstream, recorded: Recorded, tmp_path: Path
) -> None:
    directory = tmp_path / "sinks"
    sink = SinkConfig(name="lake", type="jsonl", url=directory.as_uri(), target="lake.jsonl",
                      events=["job.succeeded"])  # fmt: skip
    settings = gateway_settings(database_url, upstream.base_url, sinks=[sink],
                                tracing=TracingConfig(enabled=True))  # fmt: skip
    async with serve(settings, telemetry=recorded.telemetry) as live:
        headers = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"}
        answer = await live.client.post("/v1/jobs", json=chat("m"), headers=headers)
        await wait_for_status(live.client, answer.json()["id"], {"succeeded"})
        written = directory / "lake.jsonl"
        for _ in range(100):
            if written.exists() and written.read_bytes().strip():
                break
            await asyncio.sleep(0.05)
    [line] = [json.loads(line) for line in written.read_text().splitlines()]
    [publish] = [s for s in recorded.finished() if s.name == "publish lake"]
    assert publish.kind is SpanKind.PRODUCER
    assert format(publish.context.trace_id, "032x") == TRACE_ID
    assert line["headers"]["traceparent"] == (
        f"00-{TRACE_ID}-{format(publish.context.span_id, '016x')}-01"
    )
