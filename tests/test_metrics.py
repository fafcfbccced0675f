"""``GET /metrics`` after a known run: jobs that succeed, fail and are retried, a webhook that
ends as a dead letter, a stream being watched. The exposition parses with prometheus_client's
parser and each counter has exactly the value the run implies."""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from hookline.config import MetricsConfig
from hookline.gateway import Gateway
from tests.conftest import gateway_settings, serve, wait_for_status
from tests.scripted_upstream import Reply, ScriptedUpstream, Status, free_port
from tests.webhook_receiver import Answer, WebhookReceiver


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(found: list[Sample], name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``; 0 when there is none."""
    matching = [s for s in found if s.name == name and labels.items() <= s.labels.items()]
    assert len(matching) <= 1, matching
    return matching[0].value if matching else 0.0


async def scrape(url: str) -> str:
    async with httpx.AsyncClient() as client:
        answer = await client.get(url)
        answer.raise_for_status()
        return answer.text


def chat(model: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "hello there"}]
    return {"operation": "chat.completions", "model": model, "input": {"messages": messages},
            **extra}  # fmt: skip


async def test_the_counters_say_exactly_what_happened(
    database_url: str, upstream: ScriptedUpstream, receiver: WebhookReceiver
) -> None:
    upstream.script("refused", Status(400))
    upstream.script("flaky", Status(503), Reply())
    upstream.script("slow", Reply(first_token_delay=30))
    receiver.script("/dead", Answer(500))
    settings = gateway_settings(
        database_url, upstream.base_url, webhooks={"retry_schedule_seconds": [0.05, 0.05]}
    )
    async with serve(settings) as live:
        client = live.client
        submitted = [chat("m"), chat("m"), chat("m"), chat("refused"), chat("flaky"),
                     chat("m", webhook={"url": receiver.url("/dead")})]  # fmt: skip
        ids = [(await client.post("/v1/jobs", json=body)).json()["id"] for body in submitted]
        for job_id in ids:
            await wait_for_status(client, job_id, {"succeeded", "failed"})
        await receiver.wait_for("/dead", 3)  # the first attempt and both retries
        # A job that stays running, and one that waits behind it, while the scrape happens.
        slow = (await client.post("/v1/jobs", json=chat("slow"))).json()["id"]
        await wait_for_status(client, slow, {"running"})
        async with client.stream("GET", "/v1/events", headers={"Accept": "text/event-stream"}):
            await asyncio.sleep(0.2)
            deadline = asyncio.get_running_loop().time() + 10
            while True:  # until the dead letter's outcome is recorded
                text = await scrape(f"{live.base_url}/metrics")
                found = samples(text)
                if value(found, "hookline_deliveries_total", outcome="dead") or (
                    asyncio.get_running_loop().time() > deadline
                ):
                    break
                await asyncio.sleep(0.05)
        await client.post(f"/v1/jobs/{slow}/cancel")

    assert all(s.labels.get("role") == "serve" for s in found)
    chat_jobs = {"operation": "chat.completions", "upstream": "scripted"}
    assert value(found, "hookline_jobs_accepted_total", **chat_jobs) == 7
    assert value(found, "hookline_jobs_finished_total", **chat_jobs, status="succeeded") == 5
    assert value(found, "hookline_jobs_finished_total", **chat_jobs, status="failed") == 1
    assert value(found, "hookline_job_retries_total", upstream="scripted",
                 reason="upstream_error") == 1  # fmt: skip
    calls = {"upstream": "scripted", "operation": "chat.completions"}
    assert value(found, "hookline_upstream_requests_total", **calls, status="ok") == 5
    assert value(found, "hookline_upstream_requests_total", **calls, status="400") == 1
    assert value(found, "hookline_upstream_requests_total", **calls, status="503") == 1
    assert value(found, "hookline_delivery_attempts_total", kind="webhook", status="500") == 3
    assert value(found, "hookline_deliveries_total", kind="webhook", outcome="dead") == 1
    assert value(found, "hookline_deliveries_total", kind="webhook", outcome="delivered") == 0
    assert value(found, "hookline_accept_duration_seconds_count") == 7
    assert value(found, "hookline_accept_duration_seconds_bucket", le="+Inf") == 7
    # Eight attempts started (the flaky job's twice), five produced text, six ended.
    assert value(found, "hookline_queue_wait_seconds_count", upstream="scripted") == 8
    assert value(found, "hookline_time_to_first_token_seconds_count", upstream="scripted") == 5
    ran = {"upstream": "scripted"}
    assert value(found, "hookline_run_duration_seconds_count", **ran, status="succeeded") == 5
    assert value(found, "hookline_run_duration_seconds_count", **ran, status="failed") == 1
    # The database's gauges, and this process's.
    assert value(found, "hookline_jobs_running", upstream="scripted") == 1
    assert value(found, "hookline_worker_jobs_in_flight", upstream="scripted") == 1
    assert value(found, "hookline_outbox_depth") == 0
    assert value(found, "hookline_stream_subscribers", watching="tenant") == 1
    assert value(found, "hookline_build_info") == 1
    # The sample Grafana dashboard asks for these metrics only.
    families = {family.name for family in text_string_to_metric_families(text)}
    dashboard = (Path(__file__).parent.parent / "docs" / "grafana" / "hookline.json").read_text()
    asked = {
        re.sub(r"_(bucket|total)$", "", name) for name in re.findall(r"hookline_\w+", dashboard)
    }
    assert asked and asked <= families, asked - families


async def test_a_queue_shows_its_depth_and_age(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings = gateway_settings(database_url, upstream.base_url)
    async with serve(settings, run_worker=False) as live:  # nothing runs: jobs stay queued
        for _ in range(4):
            await live.client.post("/v1/jobs", json=chat("m"))
        await asyncio.sleep(0.3)
        found = samples((await live.client.get("/metrics")).text)
    assert value(found, "hookline_queue_depth", upstream="scripted") == 4
    assert value(found, "hookline_queue_oldest_age_seconds", upstream="scripted") >= 0.3
    assert all(s.labels["role"] == "api" for s in found)


async def test_a_worker_serves_its_metrics_on_a_port_of_its_own(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    port = free_port()
    settings = gateway_settings(database_url, upstream.base_url, metrics=MetricsConfig(port=port))
    gateway = Gateway(settings, serve_api=False)
    await gateway.start()
    try:
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"http://127.0.0.1:{port}/metrics")
    finally:
        await gateway.stop()
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    found = samples(answer.text)
    assert value(found, "hookline_build_info", role="worker") == 1
    with contextlib.suppress(httpx.ConnectError):  # stopped with the gateway
        await scrape(f"http://127.0.0.1:{port}/metrics")
        raise AssertionError("the metrics port is still open")


async def test_metrics_turned_off_are_not_served(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings = gateway_settings(
        database_url, upstream.base_url, metrics=MetricsConfig(enabled=False)
    )
    async with serve(settings) as live:
        job = (await live.client.post("/v1/jobs", json=chat("m"))).json()
        await wait_for_status(live.client, job["id"], {"succeeded"})
        assert (await live.client.get("/metrics")).status_code == 404
        assert not live.gateway.telemetry.metrics.accepted_total


async def test_a_sinks_messages_are_counted_under_its_kind(
    database_url: str, upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    """Data sinks report as webhooks do, under the sink's type: two jobs' terminal events
    written to a JSONL file are two attempts ``ok`` and two messages delivered."""
    from hookline.config import SinkConfig

    audit = SinkConfig(name="audit", type="jsonl", url=tmp_path.as_uri(), target="audit.jsonl")
    settings = gateway_settings(database_url, upstream.base_url, sinks=[audit])
    async with serve(settings) as live:
        for _ in range(2):
            job_id = (await live.client.post("/v1/jobs", json=chat("m"))).json()["id"]
            await wait_for_status(live.client, job_id, {"succeeded"})
        async with asyncio.timeout(10):
            while True:
                found = samples(await scrape(f"{live.base_url}/metrics"))
                if value(found, "hookline_deliveries_total", kind="jsonl") >= 2:
                    break
                await asyncio.sleep(0.05)
    assert value(found, "hookline_delivery_attempts_total", kind="jsonl", status="ok") == 2
    assert value(found, "hookline_delivery_attempts_total", kind="jsonl", status="error") == 0
    assert value(found, "hookline_deliveries_total", kind="jsonl", outcome="delivered") == 2
    assert value(found, "hookline_delivery_latency_seconds_count", kind="jsonl") == 2
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 2
