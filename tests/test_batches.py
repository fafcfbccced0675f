"""Batches: OpenAI's file + batch flow with the official SDK, the one-call JSONL submit,
validation, cancel, restart, per-item failures, callbacks, and interactive work alongside."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook

import hookline.batches.format
import hookline.batches.service
from hookline.config import BatchesConfig, Settings
from hookline.errors import StoreUnavailable
from hookline.store.schema import batches, jobs
from tests.conftest import LiveGateway, gateway_settings, serve
from tests.scripted_upstream import Reply, ScriptedUpstream, Status
from tests.sse import read_sse
from tests.webhook_receiver import WebhookReceiver


def _line(i: int, model: str = "m", url: str = "/v1/chat/completions", **extra: Any) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": f"item {i}"}]}
    return json.dumps({"custom_id": f"c{i}", "method": "POST", "url": url, "body": body, **extra})


def _jsonl(n: int, **extra: Any) -> bytes:
    return ("\n".join(_line(i, **extra) for i in range(n)) + "\n").encode()


@pytest.fixture
async def sdk(live: LiveGateway) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{live.base_url}/v1", api_key=live.api_key, max_retries=0)
    yield client
    await client.close()


async def _until_done(sdk: openai.AsyncOpenAI, batch_id: str, timeout: float = 30) -> Any:
    for _ in range(int(timeout / 0.1)):
        batch = await sdk.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        await asyncio.sleep(0.1)
    raise AssertionError(f"batch {batch_id} still {batch.status}")


async def test_the_sdk_file_and_batch_flow_end_to_end(
    live: LiveGateway, sdk: openai.AsyncOpenAI
) -> None:
    uploaded = await sdk.files.create(file=("in.jsonl", _jsonl(5)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(_jsonl(5))
    batch = await sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"run": "nightly"},
    )  # fmt: skip
    assert batch.status in ("in_progress", "validating")
    done = await _until_done(sdk, batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (5, 5)
    assert done.error_file_id is None and done.metadata == {"run": "nightly"}
    content = await sdk.files.content(done.output_file_id)
    lines = [json.loads(line) for line in content.text.splitlines()]
    assert [line["custom_id"] for line in lines] == [f"c{i}" for i in range(5)]  # input order
    for i, line in enumerate(lines):
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["choices"][0]["message"]["content"] == f"echo: item {i}"
        assert line["error"] is None
    listed = await sdk.batches.list()
    assert [b.id for b in listed.data] == [batch.id]


async def test_a_jsonl_body_batch_calls_back_signed_and_streams_its_events(
    database_url: str, upstream: ScriptedUpstream, receiver: WebhookReceiver
) -> None:
    settings = gateway_settings(database_url, upstream.base_url, batches=FAST_BATCHES)
    async with serve(settings) as live:
        params = {"endpoint": "/v1/chat/completions", "webhook_url": receiver.url()}
        created = await live.client.post(
            "/v1/batches", content=_jsonl(4), params=params,
            headers={"Content-Type": "application/jsonl"},
        )  # fmt: skip
        assert created.status_code == 200, created.text
        batch = created.json()
        events = await read_sse(live.client, f"/v1/batches/{batch['id']}/events")
        assert events.messages[-1].event == "batch.completed"
        final = events.messages[-1].json()["data"]
        assert final["status"] == "completed" and final["request_counts"]["completed"] == 4
        [message] = await receiver.wait_for("/hook", 1)
        secret = (await live.client.get("/v1/webhook-secret")).json()["secret"]
        body = Webhook(secret).verify(message.body, message.headers)
        assert body["type"] == "batch.completed"
        assert body["data"]["id"] == batch["id"] and body["data"]["output_file_id"]
        await asyncio.sleep(0.3)
        assert len(receiver.at("/hook")) == 1  # no job.* messages: the filter did not ask
        # The batch is not a job, and another tenant sees nothing of it.
        assert (await live.client.get(f"/v1/jobs/{batch['id']}")).status_code == 404
        listed = (await live.client.get("/v1/jobs", params={"limit": 50})).json()["data"]
        assert {job["batch_id"] for job in listed} == {batch["id"]}
        other = await live.client_for("other")
        assert (await other.get(f"/v1/batches/{batch['id']}")).status_code == 404
        output = final["output_file_id"]
        assert (await other.get(f"/v1/files/{output}/content")).status_code == 404
        await other.aclose()


async def test_item_events_reach_the_webhook_only_when_asked(
    database_url: str, upstream: ScriptedUpstream, receiver: WebhookReceiver
) -> None:
    settings = gateway_settings(database_url, upstream.base_url, batches=FAST_BATCHES)
    async with serve(settings) as live:
        params = {"webhook_url": receiver.url(), "webhook_events": "job.succeeded,batch.completed"}
        created = await live.client.post(
            "/v1/batches", content=_jsonl(3), params=params,
            headers={"Content-Type": "application/jsonl"},
        )  # fmt: skip
        messages = await receiver.wait_for("/hook", 4)
    types = sorted(json.loads(m.body)["type"] for m in messages)
    assert types == ["batch.completed", "job.succeeded", "job.succeeded", "job.succeeded"]
    assert created.json()["id"]


async def test_every_line_is_checked_and_a_bad_batch_runs_nothing(live: LiveGateway) -> None:
    lines = [
        _line(0),
        "{not json",
        _line(0),  # the custom_id again
        _line(3, url="/v1/audio/speech"),  # (no batch endpoint)
        _line(4, model="no-such-model"),
        json.dumps({"custom_id": "c5", "method": "POST", "url": "/v1/chat/completions"}),
    ]
    live.gateway.settings.upstreams[0].models[:] = ["m"]  # only model "m" is served
    created = await live.client.post(
        "/v1/batches", content="\n".join(lines).encode(),
        headers={"Content-Type": "application/jsonl"},
    )  # fmt: skip
    batch = created.json()
    assert batch["status"] == "failed" and batch["failed_at"]
    errors = {(e["line"], e["code"]) for e in batch["errors"]["data"]}
    assert errors == {
        (2, "invalid_json"),
        (3, "duplicate_custom_id"),
        (4, "invalid_url"),
        (5, "model_not_found"),
        (6, "invalid_body"),
    }
    assert (await live.client.get("/v1/jobs")).json()["data"] == []  # nothing ran
    events = (await live.client.get(f"/v1/batches/{batch['id']}/events")).json()["data"]
    assert [e["type"] for e in events] == ["batch.failed"]


async def test_limits_and_bad_requests_are_clear_problems(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    limits = BatchesConfig(max_lines=3, max_bytes=2048)
    async with serve(gateway_settings(database_url, upstream.base_url, batches=limits)) as live:
        client = live.client
        jsonl = {"Content-Type": "application/jsonl"}
        too_big = await client.post("/v1/batches", content=b"x" * 5000, headers=jsonl)
        assert too_big.status_code == 413
        assert too_big.headers["content-type"] == "application/problem+json"
        upload = await client.post("/v1/files", files={"file": ("a.jsonl", b"x" * 3000)},
                                   data={"purpose": "batch"})  # fmt: skip
        assert upload.status_code == 413
        too_many = await client.post("/v1/batches", content=_jsonl(4), headers=jsonl)
        assert too_many.status_code == 422 and "3 lines" in too_many.json()["detail"]
        cases: list[tuple[str, dict[str, Any], int]] = [
            ("/v1/files", {"files": {"file": ("a", b"{}")}, "data": {"purpose": "fine-tune"}}, 422),
            ("/v1/files", {"data": {"purpose": "batch"}}, 422),
            ("/v1/batches", {"json": {"input_file_id": "file_nope"}}, 404),
            ("/v1/batches", {"json": {"input_file_id": "f", "completion_window": "1d"}}, 404),
            ("/v1/batches", {"json": {"input_file_id": "f", "surprise": 1}}, 422),
            ("/v1/batches", {"content": b"a,b", "headers": {"Content-Type": "text/csv"}}, 422),
        ]
        for path, kwargs, status in cases:
            response = await client.post(path, **kwargs)
            assert response.status_code == status, (path, kwargs, response.text)
            assert response.headers["content-type"] == "application/problem+json"
        good = (await client.post("/v1/files", files={"file": ("a", _jsonl(1))},
                                  data={"purpose": "batch"})).json()  # fmt: skip
        window = await client.post(
            "/v1/batches", json={"input_file_id": good["id"], "completion_window": "1d"}
        )
        assert window.status_code == 422
        assert (await client.get("/v1/batches/batch_nope")).status_code == 404
        assert (await client.post("/v1/batches/batch_nope/cancel")).status_code == 404
        assert (await client.delete("/v1/files/file_nope")).status_code == 404
        assert (await client.get("/v1/batches")).json()["data"] == []  # nothing was created


async def test_per_item_failures_land_in_the_error_file(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    upstream.script("bad", Status(400, message="no such thing"))
    settings = gateway_settings(database_url, upstream.base_url, batches=FAST_BATCHES)
    async with serve(settings) as live:
        lines = [_line(0), _line(1, model="bad"), _line(2), _line(3, model="bad")]
        batch = await _submit(live, "\n".join(lines).encode())
        done = await _wait(live, batch["id"])
        assert done["status"] == "completed"
        assert done["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
        output = await _lines_of(live, done["output_file_id"])
        errors = await _lines_of(live, done["error_file_id"])
    assert [line["custom_id"] for line in output] == ["c0", "c2"]
    assert [line["custom_id"] for line in errors] == ["c1", "c3"]
    assert all(line["response"]["status_code"] == 400 for line in errors)
    assert "no such thing" in json.dumps(errors[0]["response"]["body"])


async def test_cancel_midway_keeps_what_finished(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings = _paced(database_url, upstream, delay=0.15, concurrency=2)
    async with serve(settings) as live:
        batch = await _submit(live, _jsonl(30))
        await _until_completed(live, batch["id"], 2)
        cancelling = (await live.client.post(f"/v1/batches/{batch['id']}/cancel")).json()
        assert cancelling["status"] in ("cancelling", "cancelled")
        done = await _wait(live, batch["id"])
        output = await _lines_of(live, done["output_file_id"])
        errors = await _lines_of(live, done["error_file_id"])
    assert done["status"] == "cancelled" and done["cancelled_at"]
    assert 2 <= len(output) < 30 and len(output) + len(errors) == 30
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert done["request_counts"]["completed"] == len(output)


async def test_a_restart_midway_continues_and_runs_nothing_twice(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings = _paced(database_url, upstream, delay=0.05, concurrency=2)
    async with serve(settings) as live:
        batch = await _submit(live, _jsonl(20))
        await _until_completed(live, batch["id"], 3)
    # The gateway stopped (drained: running items were put back); a new one carries on.
    async with serve(settings) as live:
        done = await _wait(live, batch["id"])
        output = await _lines_of(live, done["output_file_id"])
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 20
    assert [line["custom_id"] for line in output] == [f"c{i}" for i in range(20)]
    bodies = [seen.body["messages"][-1]["content"] for seen in upstream.seen("m")]
    finished_twice = [b for b in set(bodies) if bodies.count(b) > 1]
    assert len(bodies) == 20 + len(finished_twice) and len(finished_twice) <= 2  # drained ones


async def test_interactive_jobs_are_served_while_a_big_batch_runs(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings = _paced(database_url, upstream, delay=0.05, concurrency=2)
    async with serve(settings) as live:
        batch = await _submit(live, _jsonl(60))
        await _until_completed(live, batch["id"], 2)
        job = (await live.client.post("/v1/jobs", json={
            "operation": "chat.completions", "model": "m",
            "input": {"messages": [{"role": "user", "content": "now"}]},
        })).json()  # fmt: skip
        finished = (await live.client.get(f"/v1/jobs/{job['id']}", params={"wait": 20})).json()
        assert finished["status"] == "succeeded"
        progress = await _get(live, batch["id"])
        # Served next, ahead of the batch's queued items: most of the batch is still to come.
        assert progress["status"] == "in_progress"
        assert progress["request_counts"]["completed"] < 30


FAST_BATCHES = BatchesConfig(poll_seconds=0.05, progress_seconds=0.2)


def _paced(
    database_url: str, upstream: ScriptedUpstream, *, delay: float, concurrency: int
) -> Settings:
    """A gateway whose items take ``delay`` each, ``concurrency`` at a time: long enough to act
    on a batch midway."""
    upstream.script("m", Reply(first_token_delay=delay))
    return gateway_settings(
        database_url, upstream.base_url, batches=FAST_BATCHES,
        upstream={"max_concurrency": concurrency},
    )  # fmt: skip


async def _submit(live: LiveGateway, jsonl: bytes) -> dict[str, Any]:
    created = await live.client.post(
        "/v1/batches", content=jsonl, headers={"Content-Type": "application/jsonl"}
    )
    assert created.status_code == 200, created.text
    batch: dict[str, Any] = created.json()
    return batch


async def _get(live: LiveGateway, batch_id: str) -> dict[str, Any]:
    batch: dict[str, Any] = (await live.client.get(f"/v1/batches/{batch_id}")).json()
    return batch


async def _until_completed(live: LiveGateway, batch_id: str, n: int) -> None:
    for _ in range(600):
        if (await _get(live, batch_id))["request_counts"]["completed"] >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"batch {batch_id} never had {n} items completed")


async def _wait(live: LiveGateway, batch_id: str, timeout: float = 30) -> dict[str, Any]:
    for _ in range(int(timeout / 0.05)):
        batch = await _get(live, batch_id)
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return batch
        await asyncio.sleep(0.05)
    raise AssertionError(f"batch {batch_id} not done: {batch}")


async def _lines_of(live: LiveGateway, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await live.client.get(f"/v1/files/{file_id}/content")
    assert content.status_code == 200
    return [json.loads(line) for line in content.text.splitlines()]


async def test_a_batch_past_its_window_expires_with_partial_results(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings = _paced(database_url, upstream, delay=0.1, concurrency=1)
    async with serve(settings) as live:
        batch = await _submit(live, _jsonl(12))
        await _until_completed(live, batch["id"], 2)
        # The window passes (a day is too long to wait for: its end is moved to now).
        passed = [
            sa.update(batches).where(batches.c.id == batch["id"]).values(expires_at=1),
            sa.update(jobs).where(jobs.c.batch_id == batch["id"]).values(expires_at=1),
        ]
        await live.gateway.database.write(
            lambda conn: [conn.execute(statement) for statement in passed]
        )
        done = await _wait(live, batch["id"])
        output = await _lines_of(live, done["output_file_id"])
        errors = await _lines_of(live, done["error_file_id"])
        events = (await live.client.get(f"/v1/batches/{batch['id']}/events")).json()["data"]
    assert done["status"] == "expired" and done["expired_at"]
    assert len(output) >= 2 and len(output) + len(errors) == 12
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}
    assert [e["type"] for e in events][-1] == "batch.expired"


async def test_progress_is_throttled_and_reaches_the_tenant_stream(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings = _paced(database_url, upstream, delay=0.05, concurrency=2)
    async with serve(settings) as live:
        batch = await _submit(live, _jsonl(40))
        done = await _wait(live, batch["id"])
        events = (await live.client.get(f"/v1/batches/{batch['id']}/events")).json()["data"]
        tenant = await read_sse(
            live.client, "/v1/events", params={"type": "batch.completed"}, limit=1
        )
    assert done["status"] == "completed"
    progress = [e for e in events if e["type"] == "batch.progress"]
    assert len(progress) >= 2  # the batch took over a second; progress every 0.2 s at most
    times = [datetime.datetime.fromisoformat(e["created_at"]) for e in progress]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    # Never more often than progress_seconds (0.2 s; the runner looks every 0.05 s). The times
    # are the events' own, taken a moment after the runner's decision: some slack.
    assert min(gaps) >= 0.15, gaps
    counts = [e["data"]["request_counts"]["completed"] for e in progress]
    assert counts == sorted(counts) and counts[-1] < 40
    assert [e["type"] for e in events][-1] == "batch.completed"
    assert sum(e["type"] == "batch.completed" for e in events) == 1
    assert tenant.messages[0].json()["data"]["id"] == batch["id"]


def _nested(depth: int) -> Any:
    """A value ``depth`` containers deep (the list holding it counts as one)."""
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


def _with_body(i: int, **extra_body: Any) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": f"item {i}"}], **extra_body}
    return json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                       "body": body})  # fmt: skip


async def test_hostile_lines_fail_the_batch_with_a_problem_per_line(live: LiveGateway) -> None:
    # Each line here was once accepted by validation and then broke the items' write: a 500,
    # and a batch left `validating` for ever.
    lines = [
        _with_body(0, extra=_nested(300)),
        _with_body(1, extra=_nested(70)),
        _with_body(2, seed=2**63),
        _with_body(3, seed=-(2**63) - 1),
        _with_body(4, user="a\u0000b"),  # PostgreSQL keeps no NUL in JSON
        _line(5, model="m" * 300),
        _with_body(6, extra=_nested(60), seed=2**63 - 1, user="12345678901234567890"),  # fine
    ]
    created = await live.client.post(
        "/v1/batches", content="\n".join(lines).encode(),
        headers={"Content-Type": "application/jsonl"},
    )  # fmt: skip
    assert created.status_code == 200, created.text
    batch = created.json()
    assert batch["status"] == "failed" and batch["failed_at"]
    errors = {(e["line"], e["code"]) for e in batch["errors"]["data"]}
    assert errors == {
        (1, "nesting_too_deep"),
        (2, "nesting_too_deep"),
        (3, "integer_out_of_range"),
        (4, "integer_out_of_range"),
        (5, "invalid_character"),
        (6, "invalid_body"),
    }
    assert all(f"line {e['line']}" in e["message"] for e in batch["errors"]["data"])
    assert (await live.client.get("/v1/jobs")).json()["data"] == []
    events = (await live.client.get(f"/v1/batches/{batch['id']}/events")).json()["data"]
    assert [e["type"] for e in events] == ["batch.failed"]
    assert (await _get(live, batch["id"]))["status"] == "failed"


async def test_a_line_longer_than_a_request_may_be_is_a_problem(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    settings = gateway_settings(database_url, upstream.base_url, jobs={"max_body_bytes": 4096})
    async with serve(settings) as live:
        huge = _with_body(1, user="x" * 5000)
        batch = await _submit(live, f"{_line(0)}\n{huge}\n{_line(2)}".encode())
    assert batch["status"] == "failed"
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == [(2, "line_too_large")]


async def test_a_refused_batch_leaves_nothing_behind(live: LiveGateway) -> None:
    live.gateway.settings.batches.max_lines = 3
    jsonl = {"Content-Type": "application/jsonl"}
    refused: list[dict[str, Any]] = [
        {"completion_window": "abc"},
        {"completion_window": "24h\n"},
        {"metadata": "notjson"},
        {"metadata": json.dumps({f"k{i}": "v" for i in range(17)})},
        {"metadata": json.dumps({"k": "v" * 513})},
        {"webhook_url": "ftp://example.com/hook"},
        {"endpoint": "/v1/audio/speech"},
    ]
    for params in refused:
        answer = await live.client.post(
            "/v1/batches", content=_jsonl(2), params=params, headers=jsonl
        )
        assert answer.status_code == 422, (params, answer.text)
        multipart = await live.client.post(
            "/v1/batches", files={"file": ("in.jsonl", _jsonl(2))}, data=params
        )
        assert multipart.status_code == 422, (params, multipart.text)
    too_many = await live.client.post("/v1/batches", content=_jsonl(4), headers=jsonl)
    assert too_many.status_code == 422
    assert (await live.client.get("/v1/files")).json()["data"] == []
    assert (await live.client.get("/v1/batches")).json()["data"] == []
    # A file uploaded before and named by id is the caller's: a refused batch leaves it be.
    uploaded = (await live.client.post(
        "/v1/files", files={"file": ("a.jsonl", _jsonl(4))}, data={"purpose": "batch"}
    )).json()  # fmt: skip
    for body in ({"input_file_id": uploaded["id"]},
                 {"input_file_id": uploaded["id"], "metadata": {f"k{i}": "v" for i in range(17)}},
                 {"input_file_id": uploaded["id"], "completion_window": "abc"}):  # fmt: skip
        assert (await live.client.post("/v1/batches", json=body)).status_code == 422
    assert [f["id"] for f in (await live.client.get("/v1/files")).json()["data"]] == [
        uploaded["id"]
    ]
    assert (await live.client.get("/v1/batches")).json()["data"] == []


async def test_a_batch_whose_items_cannot_be_written_is_not_created(
    live: LiveGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = live.gateway.queue
    real_add_items = queue.add_items
    writes = 0

    async def failing_add_items(items: Any) -> None:
        nonlocal writes
        writes += 1
        if writes == 2:
            raise StoreUnavailable("database unavailable: the disk is full")
        await real_add_items(items)

    monkeypatch.setattr(queue, "add_items", failing_add_items)
    answer = await live.client.post(
        "/v1/batches", content=_jsonl(700), headers={"Content-Type": "application/jsonl"}
    )
    assert answer.status_code == 503
    assert writes == 2  # the first 500 items were written, then taken back
    assert (await live.client.get("/v1/batches")).json()["data"] == []
    assert (await live.client.get("/v1/files")).json()["data"] == []
    counts = sa.select(sa.func.count()).select_from(jobs)
    assert await live.gateway.database.read(lambda conn: conn.execute(counts).scalar()) == 0


async def _stuck_batch(live: LiveGateway, content: bytes) -> str:
    """A batch left `validating` by a process that died (or failed) while writing its items,
    with input that validation never saw."""
    service = live.gateway.batches
    uploaded = (await live.client.post(
        "/v1/files", files={"file": ("a.jsonl", content)}, data={"purpose": "batch"}
    )).json()  # fmt: skip
    now = service.clock.now_ms()
    batch_id = "batch_stuck0000000000000000"
    row: dict[str, Any] = {
        "id": batch_id, "tenant": "acme", "status": "validating",
        "endpoint": "/v1/chat/completions", "input_file_id": uploaded["id"],
        "output_file_id": None, "error_file_id": None, "completion_window": "24h",
        "metadata": None, "errors": None, "item_events": [], "total": content.count(b"\n"),
        "completed": 0, "failed": 0, "lines_queued": 0, "created_at": now - 60_000,
        "updated_at": now - 60_000, "expires_at": now + 3_600_000, "in_progress_at": None,
        "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
        "cancelling_at": None, "cancelled_at": None, "progress_at": None,
        "lease_token": None, "lease_expires_at": None,
    }  # fmt: skip
    await service.store.insert_batch(row, service._anchor("acme", batch_id, now, None))
    return batch_id


@pytest.mark.parametrize("flaw", ["unwritable_line", "deleted_file"])
async def test_a_batch_that_cannot_be_queued_ends_failed(
    database_url: str,
    upstream: ScriptedUpstream,
    flaw: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast = FAST_BATCHES.model_copy(update={"lease_seconds": 0.5})
    monkeypatch.setattr(hookline.batches.service, "_ITEMS_PER_WRITE", 1)  # line 1 is written alone
    async with serve(gateway_settings(database_url, upstream.base_url, batches=fast)) as live:
        if flaw == "unwritable_line":
            content = f"{_line(0)}\n{_with_body(1, extra=_nested(300))}\n".encode()
        else:
            content = _jsonl(3)
        batch_id = await _stuck_batch(live, content)
        if flaw == "deleted_file":
            batch = await live.gateway.store.batches.get_batch(batch_id)
            assert batch is not None
            assert await live.gateway.store.batches.delete_file("acme", batch.input_file_id)
        done = await _wait(live, batch_id, timeout=10)
        # The row ends first, then its event is written: wait for the event.
        stream = await read_sse(live.client, f"/v1/batches/{batch_id}/events")
        events = (await live.client.get(f"/v1/batches/{batch_id}/events")).json()["data"]
        jobs_left = (await live.client.get("/v1/jobs")).json()["data"]
    assert done["status"] == "failed" and done["failed_at"]
    [error] = done["errors"]["data"]
    assert error["code"] == "batch_not_queued"
    assert [m.event for m in stream.messages] == ["batch.failed"]
    assert [e["type"] for e in events] == ["batch.failed"]
    # What was written before the failure does not stay queued.
    assert len(jobs_left) == (1 if flaw == "unwritable_line" else 0)
    assert all(job["status"] in ("cancelled", "succeeded") for job in jobs_left)
    assert sum("cannot be queued" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("size", range(1, 32))
async def test_the_line_reader_numbers_lines_and_never_holds_a_long_one(size: int) -> None:
    text = b"ab\n\n  \ncdef\nxyzxyzxyzxyz\ng"  # (a blank line, a line of spaces, one too long)
    pieces = [text[i : i + size] for i in range(0, len(text), size)]

    async def chunks() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    lines = [line async for line in hookline.batches.format.read_lines(chunks(), max_line=6)]
    assert lines == [(1, b"ab"), (4, b"cdef"), (5, None), (6, b"g")]
