"""Routes over several upstreams: fallback to the next target on a retryable failure, the circuit
breaker that routing respects (across processes on PostgreSQL), weights, and /v1/models."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from hookline.client import AsyncClient
from hookline.clock import ManualClock
from hookline.config import RouteConfig, RouteTarget, Settings, UpstreamConfig
from hookline.events import Event, EventType, attempts_of
from hookline.routing import CircuitState, Router
from tests.conftest import gateway_settings, serve, wait_for_status
from tests.scripted_upstream import ScriptedUpstream, Status


def routed(database_url: str, upstream: ScriptedUpstream, **circuit: Any) -> Settings:
    """Two upstreams on the scripted server, "primary" and "backup", and a route over them that
    asks each for a model of its own (the script decides how each answers)."""
    base = gateway_settings(database_url, upstream.base_url)
    template = base.upstreams[0]
    primary = template.model_copy(update={"name": "primary", "models": ["p-*"], **circuit})
    backup = template.model_copy(update={"name": "backup", "models": ["b-*"]})
    route = RouteConfig(
        model="chat-default",
        targets=[
            RouteTarget(upstream="primary", model="p-model"),
            RouteTarget(upstream="backup", model="b-model"),
        ],
    )
    return base.model_copy(update={"upstreams": [primary, backup], "routes": [route]})


def chat(model: str = "chat-default") -> dict[str, Any]:
    return {"operation": "chat.completions", "model": model,
            "input": {"messages": [{"role": "user", "content": "hi"}]}}  # fmt: skip


async def test_a_failing_first_target_falls_back_and_the_job_succeeds(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    upstream.script("p-model", Status(500, message="primary is down"))
    async with serve(routed(database_url, upstream)) as live:
        accepted = (await live.client.post("/v1/jobs", json=chat())).json()
        assert accepted["upstream"] == "primary"
        done = await wait_for_status(live.client, accepted["id"], {"succeeded"})
        events = (await live.client.get(f"/v1/jobs/{done['id']}/events")).json()["data"]
        page = (await live.client.get("/v1/jobs")).json()
        shown = (await live.client.get(f"/dashboard/jobs/{done['id']}")).text
        async with AsyncClient(live.base_url, live.api_key) as client:
            read = await client.get(done["id"])
    assert done["attempts"] == 2 and done["upstream"] == "backup"
    assert done["model"] == "chat-default"
    assert done["output"]["choices"][0]["message"]["content"] == "echo: hi"
    started = [e["data"] for e in events if e["type"] == "job.started"]
    assert started == [{"attempt": 1, "upstream": "primary"}, {"attempt": 2, "upstream": "backup"}]
    (log,) = [e["data"] for e in events if e["type"] == "job.log"]
    assert log["upstream"] == "primary" and log["attempt"] == 1
    assert "falling back to backup" in log["message"]
    assert log["error"]["upstream_status"] == 500
    # The job's GET shows both attempts: where each ran, what it asked for, how it ended.
    first_try, second_try = done["attempt_log"]
    assert first_try["attempt"] == 1 and first_try["upstream"] == "primary"
    assert first_try["model"] == "p-model" and first_try["outcome"] == "retried"
    assert first_try["error"]["upstream_status"] == 500
    assert first_try["started_at"] <= first_try["ended_at"] <= second_try["started_at"]
    assert second_try["attempt"] == 2 and second_try["upstream"] == "backup"
    assert second_try["model"] == "b-model" and second_try["outcome"] == "succeeded"
    assert second_try["error"] is None and second_try["ended_at"] == done["finished_at"]
    # Only the GET of one job reads the attempts; the list leaves them out.
    (listed,) = [j for j in page["data"] if j["id"] == done["id"]]
    assert "attempt_log" not in listed and listed["attempts"] == 2
    # The Python client reads them too; the dashboard's job page tells the same two attempts.
    assert read.attempt_log is not None
    assert [(a.attempt, a.upstream, a.outcome) for a in read.attempt_log] == [
        (1, "primary", "retried"), (2, "backup", "succeeded")]  # fmt: skip
    table = shown.split('id="attempts"')[1].split("</table>")[0]
    assert table.count("<tr><td>") == 2 and "falling back to backup" in table
    # Each target was asked for its own model; the fallback did not wait for a backoff.
    (first,) = upstream.seen("p-model")
    (second,) = upstream.seen("b-model")
    assert second.at - first.at < 0.5


async def test_an_open_circuit_is_skipped_then_closes_again(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    upstream.script("p-model", Status(503), Status(503), Status(503))
    settings = routed(database_url, upstream, circuit_failures=2, circuit_cooldown_seconds=1.0)
    async with serve(settings) as live:
        for _ in range(2):  # two failures in a row: the circuit opens
            job = (await live.client.post("/v1/jobs", json=chat())).json()
            await wait_for_status(live.client, job["id"], {"succeeded"})
        router = live.gateway.queue.router
        assert router.state("primary") is CircuitState.OPEN
        sent = upstream.counts["p-model"]
        # While it is open, new jobs go straight to the backup: nothing is sent to the primary.
        job = (await live.client.post("/v1/jobs", json=chat())).json()
        assert job["upstream"] == "backup"
        done = await wait_for_status(live.client, job["id"], {"succeeded"})
        assert done["attempts"] == 1 and upstream.counts["p-model"] == sent
        # After the cool-down one trial goes to the primary; it answers, and the circuit closes.
        await asyncio.sleep(1.1)
        upstream.script("p-model", *[])  # (no script: it answers)
        assert router.state("primary") is CircuitState.HALF_OPEN
        job = (await live.client.post("/v1/jobs", json=chat())).json()
        assert job["upstream"] == "primary"
        done = await wait_for_status(live.client, job["id"], {"succeeded"})
        assert done["upstream"] == "primary" and done["attempts"] == 1
        assert router.state("primary") is CircuitState.CLOSED


async def test_a_lone_upstream_with_an_open_circuit_waits_for_it(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    upstream.script("p-lone", Status(500), Status(500), Status(500))
    settings = routed(database_url, upstream, circuit_failures=2, circuit_cooldown_seconds=1.0)
    settings = settings.model_copy(
        update={"jobs": settings.jobs.model_copy(update={"max_attempts": 4})}
    )
    async with serve(settings) as live:
        job = (await live.client.post("/v1/jobs", json=chat("p-lone"))).json()
        await asyncio.sleep(0.6)  # two failures: open; its next attempt waits for the trial
        upstream.script("p-lone", *[])
        done = await wait_for_status(live.client, job["id"], {"succeeded"})
        events = (await live.client.get(f"/v1/jobs/{done['id']}/events")).json()["data"]
    messages = [e["data"]["message"] for e in events if e["type"] == "job.log"]
    assert any("circuit is open" in m for m in messages)
    assert upstream.counts["p-lone"] == 3  # the circuit's attempt sent nothing


async def test_a_circuit_opened_in_one_process_is_open_in_the_others(
    postgres_url: str, upstream: ScriptedUpstream
) -> None:
    upstream.script("p-model", Status(503))
    settings = routed(postgres_url, upstream, circuit_failures=1, circuit_cooldown_seconds=30)
    async with serve(settings) as worker, serve(settings, run_worker=False) as api:
        job = (await worker.client.post("/v1/jobs", json=chat())).json()
        await wait_for_status(worker.client, job["id"], {"succeeded"})
        assert worker.gateway.queue.router.state("primary") is CircuitState.OPEN
        other = api.gateway.queue.router
        for _ in range(100):
            if other.state("primary") is CircuitState.OPEN:
                break
            await asyncio.sleep(0.05)
        assert other.state("primary") is CircuitState.OPEN
        accepted = (await api.client.post("/v1/jobs", json=chat())).json()
        assert accepted["upstream"] == "backup"


async def test_models_lists_routes_and_upstream_models(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings = routed(database_url, upstream)
    listed = settings.upstreams[1].model_copy(update={"models": ["b-*", "b-large"]})
    settings = settings.model_copy(update={"upstreams": [settings.upstreams[0], listed]})
    async with serve(settings) as live:
        models = (await live.client.get("/v1/models")).json()["data"]
    assert [(m["id"], m["owned_by"]) for m in models] == [
        ("chat-default", "hookline"),
        ("b-large", "backup"),
    ]


def test_weights_share_the_first_tries() -> None:
    upstreams = [UpstreamConfig(name=n, base_url="http://x") for n in ("a", "b")]
    route = RouteConfig(
        model="m",
        strategy="weight",
        targets=[RouteTarget(upstream="a", weight=3), RouteTarget(upstream="b", weight=1)],
    )
    router = Router(Settings(upstreams=upstreams, routes=[route], local_model=False), ManualClock())
    random.seed(7)
    picks = [router.choose("m", "chat.completions").name for _ in range(2000)]
    assert 2.5 < picks.count("a") / picks.count("b") < 3.5
    # The fallback of either goes through the other.
    assert router.fallback("m", "chat.completions", "a").upstream == "b"
    assert router.fallback("m", "chat.completions", "b").immediate is False


def test_the_attempt_log_counts_a_released_attempt_once() -> None:
    def event(seq: int, type: EventType, **data: Any) -> Event:
        return Event(seq, "job_1", "t", seq, type, data, 1000 * seq)

    retried = {"type": "upstream_error", "message": "down", "upstream_status": 503}
    events = [
        event(1, EventType.QUEUED),
        event(2, EventType.STARTED, attempt=1, upstream="a"),
        event(
            3,
            EventType.LOG,
            level="warning",
            message="attempt 1 failed",
            attempt=1,
            upstream="a",
            error=retried,
        ),
        event(4, EventType.STARTED, attempt=2, upstream="b"),
        event(5, EventType.OUTPUT_DELTA, attempt=2, text="x"),
        event(6, EventType.LOG, level="info", message="worker stopped; job requeued"),
        event(7, EventType.STARTED, attempt=2, upstream="b"),
        event(8, EventType.FAILED, attempt=2, error={"type": "bad", "message": "no"}),
    ]
    # All that happened (the dashboard), and what counts (the API: as many as job.attempts).
    assert [(a.n, a.outcome) for a in attempts_of(events)] == [
        (1, "retried"), (2, "released"), (2, "failed")]  # fmt: skip
    counted = attempts_of(events, counted=2)
    assert [(a.n, a.upstream, a.outcome, a.started_at, a.ended_at) for a in counted] == [
        (1, "a", "retried", 2000, 3000), (2, "b", "failed", 7000, 8000)]  # fmt: skip
    assert counted[0].error == retried and counted[1].detail == "no"
    # Released and not started again: it does not count yet.
    assert [a.n for a in attempts_of(events[:6], counted=1)] == [1]


def test_a_route_names_known_upstreams_once() -> None:
    upstreams = [UpstreamConfig(name="a", base_url="http://x")]
    with pytest.raises(ValueError, match="no upstream named"):
        Settings(upstreams=upstreams, local_model=False,
                 routes=[RouteConfig(model="m", targets=[RouteTarget(upstream="z")])])  # fmt: skip
    with pytest.raises(ValueError, match="once"):
        Settings(upstreams=upstreams, local_model=False, routes=[RouteConfig(
            model="m", targets=[RouteTarget(upstream="a"), RouteTarget(upstream="a")])])  # fmt: skip
