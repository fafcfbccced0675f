"""Provider batches: a hookline batch whose items run as one provider batch (OpenAI's Batch API,
Anthropic's Message Batches) against scripted providers, on both databases: results, per-item
webhooks, progress, the inbound webhook and its refusals, polling when it never comes, cancel,
expiry; and SIGKILLs of the worker mid-way (tests/processes.py)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hookline.config import BatchesConfig, Settings, UpstreamConfig
from hookline.upstreams.provider_batches import AnthropicBatches
from tests.conftest import LiveGateway, gateway_settings, serve
from tests.processes import GatewayProcess, hookline
from tests.scripted_provider_batches import Behaviour, ScriptedProviderBatches, new_secret, sign
from tests.scripted_upstream import Status, Threaded
from tests.webhook_receiver import WebhookReceiver

FAST = BatchesConfig(poll_seconds=0.05, progress_seconds=0.1)
JSONL = {"Content-Type": "application/jsonl"}


@pytest.fixture
async def provider() -> AsyncIterator[ScriptedProviderBatches]:
    server = ScriptedProviderBatches()
    await server.start()
    yield server
    await server.stop()


def _jsonl(n: int, model: str = "m", bad: frozenset[int] = frozenset()) -> bytes:
    lines = []
    for i in range(n):
        body = {"model": "bad" if i in bad else model,
                "messages": [{"role": "user", "content": f"item {i}"}]}  # fmt: skip
        lines.append(json.dumps({"custom_id": f"c{i}", "method": "POST",
                                 "url": "/v1/chat/completions", "body": body}))  # fmt: skip
    return ("\n".join(lines) + "\n").encode()


def _settings(database_url: str, provider: ScriptedProviderBatches, **upstream: Any) -> Settings:
    changes = {"batch_api": True, "batch_poll_seconds": 0.05, "batch_poll_max_seconds": 0.2,
               "stream": False, **upstream}  # fmt: skip
    return gateway_settings(database_url, provider.base_url, batches=FAST, upstream=changes)


async def _submit(live: LiveGateway, jsonl: bytes, **params: str) -> dict[str, Any]:
    created = await live.client.post("/v1/batches", content=jsonl, params=params, headers=JSONL)
    assert created.status_code == 200, created.text
    batch: dict[str, Any] = created.json()
    return batch


async def _wait(live: LiveGateway, batch_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        batch: dict[str, Any] = (await live.client.get(f"/v1/batches/{batch_id}")).json()
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} not done: {batch}")
        await asyncio.sleep(0.05)


async def _lines(client: httpx.AsyncClient, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.get(f"/v1/files/{file_id}/content")
    assert content.status_code == 200
    return [json.loads(line) for line in content.text.splitlines()]


def _comparable(lines: list[dict[str, Any]]) -> list[Any]:
    """A result file without the ids that name the batch and its items."""
    return [(line["custom_id"], line["response"] and {**line["response"], "request_id": None},
             line["error"]) for line in lines]  # fmt: skip


async def _events(live: LiveGateway, batch_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = (await live.client.get(f"/v1/batches/{batch_id}/events")).json()[
        "data"
    ]
    return events


async def test_two_thousand_items_run_as_one_provider_batch(
    database_url: str, provider: ScriptedProviderBatches, receiver: WebhookReceiver
) -> None:
    n = 2000
    provider.behaviour.duration = 1.0
    provider.script("bad", Status(400, message="no such thing"))  # the single calls' answer
    settings = _settings(database_url, provider)
    async with serve(settings) as live:
        params = {"webhook_url": receiver.url(), "webhook_events": "job.succeeded,job.failed,"
                  "batch.completed"}  # fmt: skip
        batch = await _submit(live, _jsonl(n, bad=frozenset({7, 1500})), **params)
        done = await _wait(live, batch["id"])
        output = await _lines(live.client, done["output_file_id"])
        errors = await _lines(live.client, done["error_file_id"])
        events = await _events(live, batch["id"])
        messages = await receiver.wait_for("/hook", n + 1, timeout=60)
        # The same requests as single calls, on the same upstream: the same results.
        single = await _submit(live, _jsonl(n, bad=frozenset({7, 1500})), execution="single")
        single_done = await _wait(live, single["id"], timeout=120)
        single_output = await _lines(live.client, single_done["output_file_id"])
        single_errors = await _lines(live.client, single_done["error_file_id"])
        item = (await live.client.get(f"/v1/jobs/{output[0]['response']['request_id']}")).json()
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": n, "completed": n - 2, "failed": 2}
    assert [line["custom_id"] for line in output] == [
        f"c{i}" for i in range(n) if i not in (7, 1500)
    ]
    assert [line["custom_id"] for line in errors] == ["c7", "c1500"]
    assert output[3]["response"]["body"]["choices"][0]["message"]["content"] == "echo: item 3"
    assert errors[0]["response"]["status_code"] == 400
    assert _comparable(output) == _comparable(single_output)
    assert _comparable(errors) == _comparable(single_errors)
    # One provider batch; no single call for its items (the single run made n of them).
    created = [b for b in provider.batches.values() if b.kind == "openai"]
    assert len(created) == 1 and len(created[0].requests) == n
    assert len(provider.requests) == n  # every single call is the second run's
    assert item["upstream"] == "scripted#batch" and item["status"] == "succeeded"
    # Progress only grows; one batch.completed, last.
    progress = [e["data"]["request_counts"] for e in events if e["type"] == "batch.progress"]
    done_counts = [c["completed"] + c["failed"] for c in progress]
    assert progress and done_counts == sorted(done_counts)
    assert [e["type"] for e in events].count("batch.completed") == 1
    assert events[-1]["type"] == "batch.completed"
    # A webhook per item as results arrive, and one for the batch; none twice.
    bodies = [json.loads(m.body) for m in messages]
    items = Counter(b["data"]["custom_id"] for b in bodies if b["type"].startswith("job."))
    assert len(items) == n and set(items.values()) == {1}
    assert sum(b["type"] == "batch.completed" for b in bodies) == 1


async def test_anthropic_message_batches(
    database_url: str, provider: ScriptedProviderBatches
) -> None:
    settings = _settings(database_url, provider)
    anthropic = UpstreamConfig(
        name="claude", type="anthropic", base_url=provider.base_url, models=["claude-*"],
        batch_api=True, batch_poll_seconds=0.05, batch_poll_max_seconds=0.2,
    )  # fmt: skip
    settings = settings.model_copy(update={"upstreams": [anthropic, *settings.upstreams]})
    async with serve(settings) as live:
        batch = await _submit(live, _jsonl(30, model="claude-x", bad=frozenset({4})))
        done = await _wait(live, batch["id"])
        output = await _lines(live.client, done["output_file_id"])
        errors = await _lines(live.client, done["error_file_id"])
    assert done["status"] == "completed"
    assert [line["custom_id"] for line in output] == [f"c{i}" for i in range(30) if i != 4]
    body = output[0]["response"]["body"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "echo: item 0"
    assert body["usage"]["completion_tokens"] == 1
    assert [line["custom_id"] for line in errors] == ["c4"]
    [created] = [b for b in provider.batches.values() if b.kind == "anthropic"]
    assert created.requests[0]["params"]["max_tokens"] == 4096  # translated as one call is


async def test_the_inbound_webhook_is_verified_and_polling_still_finishes(
    database_url: str, provider: ScriptedProviderBatches
) -> None:
    secret = new_secret()
    # Polls so rare that only the webhook can end the batch soon; then none at all.
    settings = _settings(database_url, provider, webhook_secret=secret, batch_poll_seconds=30,
                         batch_poll_max_seconds=30)  # fmt: skip
    provider.behaviour.poll_after_ms = None
    async with serve(settings) as live:
        provider.behaviour.webhook_url = f"{live.base_url}/v1/inbound/scripted"
        provider.behaviour.webhook_secret = secret
        batch = await _submit(live, _jsonl(5))
        started = time.monotonic()
        done = await _wait(live, batch["id"], timeout=20)
        assert time.monotonic() - started < 10 and done["status"] == "completed"
        assert provider.webhooks_sent == [200]
        # Refused: a bad signature, an old timestamp, a replay, an unknown upstream.
        url = "/v1/inbound/scripted"
        body = json.dumps({"type": "batch.completed", "data": {"id": "batch_x"}}).encode()
        now = int(time.time())
        good = sign(secret, "evt_1", now, body)
        forged = {
            **good,
            "webhook-signature": sign(new_secret(), "evt_1", now, body)["webhook-signature"],
        }
        old = sign(secret, "evt_2", now - 3600, body)
        plain = httpx.AsyncClient(base_url=live.base_url)
        assert (await plain.post(url, content=body, headers=forged)).status_code == 401
        assert (await plain.post(url, content=body, headers=old)).status_code == 401
        assert (await plain.post(url, content=body)).status_code == 401
        first = await plain.post(url, content=body, headers=good)
        assert first.status_code == 200 and first.json() == {"received": True, "known": False}
        assert (await plain.post(url, content=body, headers=good)).status_code == 409
        assert (await plain.post("/v1/inbound/nope", content=body, headers=good)).status_code == 404
        await plain.aclose()
    # No webhook (a wrong secret at the provider): polling alone ends the batch.
    settings = _settings(database_url, provider, webhook_secret=secret)
    provider.behaviour.webhook_secret = new_secret()
    async with serve(settings) as live:
        provider.behaviour.webhook_url = f"{live.base_url}/v1/inbound/scripted"
        batch = await _submit(live, _jsonl(5))
        done = await _wait(live, batch["id"], timeout=20)
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 5
    assert provider.webhooks_sent[-1] == 401


async def test_cancel_is_forwarded_and_keeps_what_finished(
    database_url: str, provider: ScriptedProviderBatches
) -> None:
    provider.behaviour.duration = 3.0
    async with serve(_settings(database_url, provider)) as live:
        batch = await _submit(live, _jsonl(100))
        for _ in range(200):
            current = (await live.client.get(f"/v1/batches/{batch['id']}")).json()
            if current["request_counts"]["completed"] >= 10:
                break
            await asyncio.sleep(0.05)
        cancelling = (await live.client.post(f"/v1/batches/{batch['id']}/cancel")).json()
        assert cancelling["status"] == "cancelling"
        done = await _wait(live, batch["id"])
        output = await _lines(live.client, done["output_file_id"])
        errors = await _lines(live.client, done["error_file_id"])
    assert done["status"] == "cancelled"
    [created] = provider.batches.values()
    assert created.ended == "cancelled"  # the cancel reached the provider
    assert 10 <= len(output) < 100 and len(output) + len(errors) == 100
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}


async def test_expiry_at_the_provider_expires_the_items_left(
    database_url: str, provider: ScriptedProviderBatches
) -> None:
    provider.behaviour.duration = 2.0
    provider.behaviour.expire = True
    provider.behaviour.expire_after = 0.6
    async with serve(_settings(database_url, provider)) as live:
        batch = await _submit(live, _jsonl(50))
        done = await _wait(live, batch["id"])
        output = await _lines(live.client, done["output_file_id"])
        errors = await _lines(live.client, done["error_file_id"])
        events = await _events(live, batch["id"])
    assert done["status"] == "expired" and events[-1]["type"] == "batch.expired"
    assert 0 < len(output) < 50 and len(output) + len(errors) == 50
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}


# --- SIGKILL of the process driving the batch (real processes: tests/processes.py)


def _config(path: Path, provider: ScriptedProviderBatches) -> dict[str, str]:
    path.write_text(
        f"""
local_model = false

[batches]
poll_seconds = 0.05
progress_seconds = 0.1
lease_seconds = 2

[worker]
poll_seconds = 0.2
lease_seconds = 2
heartbeat_seconds = 0.5

[webhooks]
allowed_networks = ["127.0.0.0/8"]
poll_seconds = 0.05

[[upstreams]]
name = "scripted"
type = "openai"
base_url = "{provider.base_url}"
models = ["*"]
stream = false
batch_api = true
batch_poll_seconds = 0.05
batch_poll_max_seconds = 0.2
"""
    )
    return {"HOOKLINE_CONFIG": str(path)}


def _wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("when", ["after_create", "while_fetching"])
def test_a_worker_killed_midway_submits_once_and_delivers_once(
    tmp_path: Path, database_url: str, when: str
) -> None:
    n = 1200
    behaviour = Behaviour(duration=0.3)
    if when == "after_create":
        behaviour.hold_create = 60  # the batch exists; the answer never reaches the process
    else:
        behaviour.results_pause = 60  # the output file stops halfway
    receiver = WebhookReceiver()
    with Threaded(ScriptedProviderBatches(behaviour)) as provider, Threaded(receiver):
        env = {
            **_config(tmp_path / "hookline.toml", provider),
            "HOOKLINE_DATABASE_URL": database_url,
        }
        created = hookline("keys", "create", "--tenant", "acme", env=env)
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip().splitlines()[-1]
        first = GatewayProcess("serve", env, tmp_path).start()
        second: GatewayProcess | None = None
        try:
            headers = {"Authorization": f"Bearer {key}", **JSONL}
            params = {
                "webhook_url": receiver.url(),
                "webhook_events": "job.succeeded,batch.completed",
            }
            answer = httpx.post(f"{first.url}/v1/batches", content=_jsonl(n), params=params,
                                headers=headers, timeout=60)  # fmt: skip
            assert answer.status_code == 200, answer.text
            batch_id = answer.json()["id"]
            if when == "after_create":
                assert provider.created.wait(30)
            else:
                assert provider.results_started.wait(30)
                _wait_until(lambda: len(receiver.received) >= 1, 30, "the first item's webhook")
            first.kill()
            behaviour.hold_create = behaviour.results_pause = 0
            second = GatewayProcess("serve", env, tmp_path).start()

            def ended() -> bool:
                got = httpx.get(f"{second.url}/v1/batches/{batch_id}", headers=headers).json()
                return bool(got["status"] == "completed")

            _wait_until(ended, 60, "the batch to complete")
            _wait_until(lambda: len({r.id for r in receiver.received}) >= n + 1, 60, "webhooks")
        finally:
            first.stop()
            if second is not None:
                second.stop()
    assert len([b for b in provider.batches.values() if b.kind == "openai"]) == 1
    messages: dict[str, set[str]] = {}
    for received in receiver.received:
        body = json.loads(received.body)
        if body["type"] == "job.succeeded":
            messages.setdefault(body["data"]["custom_id"], set()).add(received.id)
    assert len(messages) == n
    assert all(len(ids) == 1 for ids in messages.values())  # one message per item


async def test_a_lost_anthropic_creation_is_not_matched_to_a_batch_another_part_recorded(
    provider: ScriptedProviderBatches,
) -> None:
    """Message batches carry no metadata: a lookup matches by time and size, and skips the ids
    the other parts have recorded (two parts of one size created in the same minute)."""
    claude = UpstreamConfig(
        name="claude", type="anthropic", base_url=provider.base_url, models=["claude-*"],
        api_key="sk-ant-test",
    )  # fmt: skip
    since_ms = int(time.time() * 1000)
    request = {"model": "claude-x", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}
    async with httpx.AsyncClient(base_url=provider.base_url) as http:
        ids = []
        for n in range(2):
            requests = [{"custom_id": f"c{n}{i}", "params": request} for i in range(2)]
            created = await http.post("/messages/batches", json={"requests": requests})
            ids.append(created.json()["id"])
    client = AnthropicBatches(claude)
    try:
        newest = await client.find({}, since_ms, 2)
        assert newest is not None and newest.id == ids[1]
        other = await client.find({}, since_ms, 2, taken={ids[1]})
        assert other is not None and other.id == ids[0]
        assert await client.find({}, since_ms, 2, taken=set(ids)) is None
        assert await client.find({}, since_ms, 3) is None  # another size
    finally:
        await client.close()


async def test_a_create_refused_after_the_upload_reuses_the_uploaded_file(
    database_url: str, provider: ScriptedProviderBatches
) -> None:
    """The part keeps its uploaded file's id before it creates the batch: the next attempt
    creates from that file, leaving no second upload (an orphan at the provider) behind."""
    provider.behaviour.refuse_creates = 2
    async with serve(_settings(database_url, provider)) as live:
        done = await _wait(live, (await _submit(live, _jsonl(3)))["id"])
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert (
        len(provider.files) - len([b for b in provider.batches.values() if b.output_file_id]) == 1
    )
    assert [b.input_file_id for b in provider.batches.values()] == list(provider.files)[:1]
