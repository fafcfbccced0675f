"""Webhooks through the public API: signed per Standard Webhooks, retried, ordered, replayable."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook

from hookline import webhooks
from hookline.clock import ManualClock
from hookline.store import open_store
from hookline.store.outbox import order_key
from hookline.store.schema import deliveries
from tests.conftest import LiveGateway, gateway_settings, serve, wait_for_status
from tests.scripted_upstream import ScriptedUpstream
from tests.webhook_receiver import Answer, WebhookReceiver


def chat(**extra: Any) -> dict[str, Any]:
    return {
        "operation": "chat.completions",
        "model": "m",
        "input": {"messages": [{"role": "user", "content": "hi"}]},
        **extra,
    }


@contextlib.asynccontextmanager
async def gateway(
    database_url: str, upstream: ScriptedUpstream, clock: ManualClock | None = None, **changes: Any
) -> AsyncIterator[LiveGateway]:
    async with serve(gateway_settings(database_url, upstream.base_url, **changes), clock) as live:
        yield live


async def secret_of(client: httpx.AsyncClient, endpoint_id: str | None = None) -> str:
    path = f"/v1/webhook-endpoints/{endpoint_id}/secret" if endpoint_id else "/v1/webhook-secret"
    secret: str = (await client.get(path)).json()["secret"]
    return secret


def verified(received: Any, secret: str) -> dict[str, Any]:
    """Check the message with the standardwebhooks package itself, and return its body."""
    body: dict[str, Any] = Webhook(secret).verify(received.body, received.headers)
    return body


async def test_job_webhook_sends_the_terminal_event_signed(
    live: LiveGateway, receiver: WebhookReceiver
) -> None:
    job = (await live.client.post("/v1/jobs", json=chat(webhook={"url": receiver.url()}))).json()
    assert job["webhook"] == {"url": receiver.url(), "events": None}
    [message] = await receiver.wait_for("/hook", 1)
    secret = await secret_of(live.client)
    assert secret.startswith("whsec_")
    body = verified(message, secret)
    assert body["type"] == "job.succeeded"
    assert body["data"]["id"] == job["id"] and body["data"]["status"] == "succeeded"
    assert body["data"]["output"]["choices"][0]["message"]["content"] == "echo: hi"
    assert body["timestamp"].endswith("Z")
    event = webhooks.verify(message.body, message.headers, secret)
    assert event.id == message.id and event.type == "job.succeeded"
    with pytest.raises(webhooks.WebhookVerificationError):
        webhooks.verify(message.body + b" ", message.headers, secret)
    await asyncio.sleep(0.3)
    assert len(receiver.at("/hook")) == 1  # queued/started are not sent unless asked for
    deliveries = (await live.client.get("/v1/deliveries", params={"job_id": job["id"]})).json()
    [delivery] = deliveries["data"]
    assert delivery["id"] == message.id and delivery["status"] == "succeeded"
    detail = (await live.client.get(f"/v1/deliveries/{delivery['id']}")).json()
    [attempt] = detail["attempts_log"]
    assert attempt["status_code"] == 200 and attempt["response_excerpt"] == "ok"


async def test_event_filter_and_registered_endpoint_fan_out(
    live: LiveGateway, receiver: WebhookReceiver
) -> None:
    created = await live.client.post(
        "/v1/webhook-endpoints",
        json={"url": receiver.url("/all"), "events": ["job.*"], "description": "everything"},
    )
    assert created.status_code == 201
    endpoint = created.json()
    assert endpoint["id"].startswith("ep_") and endpoint["enabled"] is True
    webhook = {"url": receiver.url("/mine"), "events": ["job.started", "job.succeeded"]}
    job = (await live.client.post("/v1/jobs", json=chat(webhook=webhook))).json()
    mine = await receiver.wait_for("/mine", 2)
    assert [orjson.loads(m.body)["type"] for m in mine] == ["job.started", "job.succeeded"]
    for count in range(4, 50):
        everything = await receiver.wait_for("/all", count)
        if orjson.loads(everything[-1].body)["type"] == "job.succeeded":
            break
    types = [verified(m, await secret_of(live.client, endpoint["id"]))["type"] for m in everything]
    assert types[0] == "job.queued" and types[1] == "job.started" and types[-1] == "job.succeeded"
    assert "job.output.delta" in types
    assert all(
        orjson.loads(m.body)["data"].get("job_id", job["id"]) == job["id"] for m in everything
    )


async def test_failures_are_retried_on_schedule_with_one_webhook_id(
    database_url: str, upstream: ScriptedUpstream, receiver: WebhookReceiver
) -> None:
    clock = ManualClock(start_ms=1_900_000_000_000)
    schedule = [5.0, 300.0, 1800.0]
    # A 429 whose Retry-After (60 s) outlasts the schedule's 5 s, then two plain failures.
    receiver.script(
        "/hook", Answer(429, headers={"Retry-After": "60"}), Answer(500), Answer(502), Answer(200)
    )
    async with gateway(
        database_url, upstream, clock, webhooks={"retry_schedule_seconds": schedule}
    ) as live:
        await live.client.post("/v1/jobs", json=chat(webhook={"url": receiver.url()}))
        expected = [(60.0, 60.0), (300 * 0.8, 300 * 1.2), (1800 * 0.8, 1800 * 1.2)]
        for attempt, (low, high) in enumerate(expected, start=1):
            await receiver.wait_for("/hook", attempt)
            delivery = await _settled(live, attempt)
            due_in = (_ms(delivery["next_attempt_at"]) - clock.now_ms()) / 1000
            assert low - 0.01 <= due_in <= high + 0.01, (attempt, due_in)
            await asyncio.sleep(0.2)
            assert len(receiver.at("/hook")) == attempt, "sent before it was due"
            clock.advance(due_in + 0.001)
        messages = await receiver.wait_for("/hook", 4)
        assert len({m.id for m in messages}) == 1
        delivery = await _settled(live, 4)
        assert delivery["status"] == "succeeded" and delivery["attempts"] == 4
        detail = (await live.client.get(f"/v1/deliveries/{delivery['id']}")).json()
        assert [a["status_code"] for a in detail["attempts_log"]] == [429, 500, 502, 200]


def _ms(iso: str) -> int:
    import datetime

    return int(datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


async def _settled(live: LiveGateway, attempts: int) -> dict[str, Any]:
    for _ in range(200):
        [delivery] = (await live.client.get("/v1/deliveries")).json()["data"]
        if delivery["attempts"] >= attempts:
            return dict(delivery)
        await asyncio.sleep(0.02)
    raise AssertionError(f"delivery never reached {attempts} attempts")


async def test_messages_of_one_job_stay_in_order_while_one_is_retried(
    live: LiveGateway, receiver: WebhookReceiver
) -> None:
    receiver.script("/ordered", Answer(500), Answer(500), Answer(200))
    other = (
        await live.client.post("/v1/jobs", json=chat(webhook={"url": receiver.url("/other")}))
    ).json()
    webhook = {"url": receiver.url("/ordered"), "events": ["job.started", "job.succeeded"]}
    await live.client.post("/v1/jobs", json=chat(webhook=webhook))
    messages = await receiver.wait_for("/ordered", 4)
    types = [orjson.loads(m.body)["type"] for m in messages]
    assert types == ["job.started", "job.started", "job.started", "job.succeeded"]
    assert messages[0].id == messages[2].id != messages[3].id
    [other_message] = await receiver.wait_for("/other", 1)  # not held up by the retries
    assert orjson.loads(other_message.body)["data"]["id"] == other["id"]


async def test_dead_letter_then_retry_and_recover(
    live: LiveGateway, receiver: WebhookReceiver
) -> None:
    receiver.script("/down", Answer(500))
    endpoint = (
        await live.client.post("/v1/webhook-endpoints", json={"url": receiver.url("/down")})
    ).json()
    job = (await live.client.post("/v1/jobs", json=chat())).json()
    await wait_for_status(live.client, job["id"], {"succeeded"})
    await receiver.wait_for("/down", 4)  # first attempt + a schedule of three
    failed = await _wait_delivery(live, {"endpoint_id": endpoint["id"]}, "failed")
    assert failed["attempts"] == 4 and failed["last_status_code"] == 500
    receiver.script("/down", Answer(200))
    retried = await live.client.post(f"/v1/deliveries/{failed['id']}/retry")
    assert retried.status_code == 202
    await _wait_delivery(live, {"endpoint_id": endpoint["id"]}, "succeeded")
    # Fail another, then recover every failed message since a time.
    receiver.script("/down", Answer(500))
    job = (await live.client.post("/v1/jobs", json=chat())).json()
    await wait_for_status(live.client, job["id"], {"succeeded"})
    await _wait_delivery(live, {"job_id": job["id"]}, "failed")
    receiver.script("/down", Answer(200))
    recovered = await live.client.post(
        f"/v1/webhook-endpoints/{endpoint['id']}/recover", json={"since": "2000-01-01T00:00:00Z"}
    )
    assert recovered.status_code == 202 and recovered.json()["queued"] == 1
    await _wait_delivery(live, {"job_id": job["id"]}, "succeeded")


async def _wait_delivery(live: LiveGateway, params: dict[str, str], status: str) -> dict[str, Any]:
    for _ in range(300):
        found = (await live.client.get("/v1/deliveries", params=params)).json()["data"]
        if found and found[0]["status"] == status:
            return dict(found[0])
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {status} delivery for {params}: {found}")


async def test_410_disables_the_endpoint_and_reenabling_resumes(
    live: LiveGateway, receiver: WebhookReceiver
) -> None:
    receiver.script("/gone", Answer(410))
    endpoint = (
        await live.client.post("/v1/webhook-endpoints", json={"url": receiver.url("/gone")})
    ).json()
    first = (await live.client.post("/v1/jobs", json=chat())).json()
    await receiver.wait_for("/gone", 1)
    await _wait_delivery(live, {"job_id": first["id"]}, "failed")
    state = (await live.client.get(f"/v1/webhook-endpoints/{endpoint['id']}")).json()
    assert state["enabled"] is False and "410" in state["disabled_reason"]
    second = (await live.client.post("/v1/jobs", json=chat())).json()
    await wait_for_status(live.client, second["id"], {"succeeded"})
    await asyncio.sleep(0.3)
    assert len(receiver.at("/gone")) == 1
    assert (await _wait_delivery(live, {"job_id": second["id"]}, "pending"))["attempts"] == 0
    receiver.script("/gone", Answer(200))
    enabled = await live.client.patch(
        f"/v1/webhook-endpoints/{endpoint['id']}", json={"enabled": True}
    )
    assert enabled.json()["enabled"] is True and enabled.json()["disabled_reason"] is None
    await _wait_delivery(live, {"job_id": second["id"]}, "succeeded")


async def test_endpoint_failing_for_the_window_is_disabled(
    database_url: str, upstream: ScriptedUpstream, receiver: WebhookReceiver
) -> None:
    receiver.script("/flaky", Answer(503))
    changes = {"retry_schedule_seconds": [0.1] * 20, "disable_after_seconds": 0.4}
    async with gateway(database_url, upstream, webhooks=changes) as live:
        endpoint = (
            await live.client.post("/v1/webhook-endpoints", json={"url": receiver.url("/flaky")})
        ).json()
        await live.client.post("/v1/jobs", json=chat())
        for _ in range(200):
            state = (await live.client.get(f"/v1/webhook-endpoints/{endpoint['id']}")).json()
            if not state["enabled"]:
                break
            await asyncio.sleep(0.05)
        assert state["enabled"] is False and "without a success" in state["disabled_reason"]
        assert state["failing_since"] is not None


async def test_slow_receiver_is_not_stampeded(
    database_url: str, upstream: ScriptedUpstream, receiver: WebhookReceiver
) -> None:
    receiver.script("/slow", Answer(200, delay=0.2))
    async with gateway(database_url, upstream, webhooks={"max_in_flight_per_endpoint": 2}) as live:
        await live.client.post("/v1/webhook-endpoints", json={"url": receiver.url("/slow")})
        for _ in range(8):
            await live.client.post("/v1/jobs", json=chat())
        await receiver.wait_for("/slow", 8, timeout=30)
    assert receiver.max_active <= 2


async def test_rate_limited_endpoint(live: LiveGateway, receiver: WebhookReceiver) -> None:
    await live.client.post(
        "/v1/webhook-endpoints", json={"url": receiver.url("/rated"), "rate_limit_per_second": 5}
    )
    for _ in range(11):
        await live.client.post("/v1/jobs", json=chat())
    messages = await receiver.wait_for("/rated", 11, timeout=30)
    # 5/s with a burst of one second's worth: the last 6 of 11 take at least 1.2 s.
    assert messages[-1].at - messages[0].at >= 1.0


async def test_secret_rotation_signs_with_both_during_the_overlap(
    live: LiveGateway, receiver: WebhookReceiver
) -> None:
    endpoint = (
        await live.client.post("/v1/webhook-endpoints", json={"url": receiver.url("/rot")})
    ).json()
    old = await secret_of(live.client, endpoint["id"])
    rotated = await live.client.post(
        f"/v1/webhook-endpoints/{endpoint['id']}/secret/rotate", json={"overlap_seconds": 3600}
    )
    new = rotated.json()["secret"]
    assert new != old and rotated.json()["signing"] == 2
    await live.client.post("/v1/jobs", json=chat())
    [message] = await receiver.wait_for("/rot", 1)
    assert len(message.headers["webhook-signature"].split(" ")) == 2
    assert verified(message, old)["type"] == verified(message, new)["type"] == "job.succeeded"
    tenant_old = await secret_of(live.client)
    rotated = await live.client.post("/v1/webhook-secret/rotate", json={"overlap_seconds": 0})
    assert rotated.json()["secret"] != tenant_old and rotated.json()["signing"] == 1


async def test_tenants_never_see_each_others_webhooks(
    live: LiveGateway, receiver: WebhookReceiver
) -> None:
    endpoint = (
        await live.client.post("/v1/webhook-endpoints", json={"url": receiver.url()})
    ).json()
    job = (await live.client.post("/v1/jobs", json=chat())).json()
    delivery = await _wait_delivery(live, {"job_id": job["id"]}, "succeeded")
    mine = await secret_of(live.client)
    async with await live.client_for("globex") as other:
        for method, path in [
            ("GET", f"/v1/webhook-endpoints/{endpoint['id']}"),
            ("PATCH", f"/v1/webhook-endpoints/{endpoint['id']}"),
            ("DELETE", f"/v1/webhook-endpoints/{endpoint['id']}"),
            ("GET", f"/v1/webhook-endpoints/{endpoint['id']}/secret"),
            ("POST", f"/v1/webhook-endpoints/{endpoint['id']}/secret/rotate"),
            ("GET", f"/v1/deliveries/{delivery['id']}"),
            ("POST", f"/v1/deliveries/{delivery['id']}/retry"),
        ]:
            response = await other.request(
                method, path, json={} if method in ("PATCH", "POST") else None
            )
            assert response.status_code == 404, (method, path, response.text)
        assert (await other.get("/v1/webhook-endpoints")).json()["data"] == []
        assert (await other.get("/v1/deliveries")).json()["data"] == []
        assert await secret_of(other) != mine
        # Their jobs never reach my endpoint.
        theirs = (await other.post("/v1/jobs", json=chat())).json()
        await wait_for_status(other, theirs["id"], {"succeeded"})
    await asyncio.sleep(0.3)
    assert all(orjson.loads(m.body)["data"]["id"] != theirs["id"] for m in receiver.at("/hook"))


@pytest.mark.parametrize(
    "body",
    [
        {"url": "ftp://example.com/hook"},
        {"url": "not a url"},
        {"url": "http://127.0.0.1:9/hook", "events": ["job.exploded"]},
        {"url": "http://127.0.0.1:9/hook", "rate_limit_per_second": 0},
        {"url": "http://127.0.0.1:9/hook", "surprise": 1},
        {"url": ""},
    ],
)
async def test_bad_endpoint_input_is_422(live: LiveGateway, body: dict[str, Any]) -> None:
    response = await live.client.post("/v1/webhook-endpoints", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert (await live.client.get("/v1/webhook-endpoints")).json()["data"] == []


async def test_bad_webhook_requests(live: LiveGateway) -> None:
    bad_job = await live.client.post(
        "/v1/jobs", json=chat(webhook={"url": "http://127.0.0.1:9/", "events": ["nope"]})
    )
    assert bad_job.status_code == 422 and "nope" in bad_job.json()["detail"]
    assert (await live.client.get("/v1/jobs")).json()["data"] == []
    assert (await live.client.get("/v1/deliveries/msg_nope")).status_code == 404
    assert (await live.client.post("/v1/deliveries/msg_nope/retry")).status_code == 404
    assert (await live.client.get("/v1/deliveries", params={"status": "lost"})).status_code == 422
    assert (await live.client.get("/v1/webhook-endpoints/ep_nope")).status_code == 404
    endpoint = (
        await live.client.post("/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/"})
    ).json()
    bad_since = await live.client.post(
        f"/v1/webhook-endpoints/{endpoint['id']}/recover", json={"since": "yesterday"}
    )
    assert bad_since.status_code == 422
    bad_patch = await live.client.patch(
        f"/v1/webhook-endpoints/{endpoint['id']}", json={"events": ["x"]}
    )
    assert bad_patch.status_code == 422
    assert (await live.client.delete(f"/v1/webhook-endpoints/{endpoint['id']}")).status_code == 204
    assert (await live.client.delete(f"/v1/webhook-endpoints/{endpoint['id']}")).status_code == 404


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8080/hook",  # a name that resolves to 127.0.0.1
        "http://127.0.0.1/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.5/hook",
        "http://192.168.1.1/hook",
        "http://224.0.0.1/hook",
        "http://[::ffff:127.0.0.1]/hook",
    ],
)
async def test_ssrf_non_public_addresses_are_refused(
    database_url: str, upstream: ScriptedUpstream, url: str
) -> None:
    async with gateway(database_url, upstream, webhooks={"allowed_networks": []}) as live:
        response = await live.client.post("/v1/jobs", json=chat(webhook={"url": url}))
        assert response.status_code == 422
        assert "public" in response.json()["detail"]
        response = await live.client.post("/v1/webhook-endpoints", json={"url": url})
        assert response.status_code == 422
        assert (await live.client.get("/v1/jobs")).json()["data"] == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_ssrf_is_checked_again_when_sending(
    database_url: str, upstream: ScriptedUpstream, receiver: WebhookReceiver
) -> None:
    hook = receiver.url().replace("127.0.0.1", "localhost")
    async with gateway(database_url, upstream) as live:  # loopback allowed while submitting
        job = (await live.client.post("/v1/jobs", json=chat(webhook={"url": hook}))).json()
        await wait_for_status(live.client, job["id"], {"succeeded"})
        await receiver.wait_for("/hook", 1)
    # The same host, once loopback is no longer allowed: refused at connect time.
    async with gateway(database_url, upstream, webhooks={"allowed_networks": []}) as live:
        key = await live.gateway.keys.create("acme")
        async with httpx.AsyncClient(
            base_url=live.base_url, headers={"Authorization": f"Bearer {key}"}
        ) as client:
            delivery = (await client.get("/v1/deliveries")).json()["data"][0]
            await client.post(f"/v1/deliveries/{delivery['id']}/retry")
            for _ in range(100):
                detail = (await client.get(f"/v1/deliveries/{delivery['id']}")).json()
                if len(detail["attempts_log"]) == 2:
                    break
                await asyncio.sleep(0.05)
        assert "non-public" in detail["attempts_log"][-1]["error"]
    assert len(receiver.at("/hook")) == 1


async def test_redirects_are_not_followed(live: LiveGateway, receiver: WebhookReceiver) -> None:
    receiver.script("/moved", Answer(302, headers={"Location": receiver.url("/target")}))
    job = (
        await live.client.post("/v1/jobs", json=chat(webhook={"url": receiver.url("/moved")}))
    ).json()
    await receiver.wait_for("/moved", 2)  # a 3xx is a failure: retried, never followed
    for _ in range(100):
        [delivery] = (await live.client.get("/v1/deliveries", params={"job_id": job["id"]})).json()[
            "data"
        ]
        if delivery["attempts"] >= 2:
            break
        await asyncio.sleep(0.02)
    assert delivery["last_status_code"] == 302 and "302" in delivery["last_error"]
    assert receiver.at("/target") == []


async def test_output_deltas_are_throttled_and_complete(
    live: LiveGateway, upstream: ScriptedUpstream, receiver: WebhookReceiver
) -> None:
    from tests.scripted_upstream import Reply

    upstream.script(
        "streamy", Reply(text="abcdefghijklmnopqrstuvwxyz" * 2, chunks=26, token_delay=0.05)
    )
    await live.client.post(
        "/v1/webhook-endpoints",
        json={"url": receiver.url("/deltas"), "events": ["job.output.delta", "job.succeeded"]},
    )
    job = (await live.client.post("/v1/jobs", json={**chat(), "model": "streamy"})).json()
    done = await wait_for_status(live.client, job["id"], {"succeeded"})
    for count in range(2, 60):
        messages = await receiver.wait_for("/deltas", count)
        if orjson.loads(messages[-1].body)["type"] == "job.succeeded":
            break
    deltas = [m for m in messages if orjson.loads(m.body)["type"] == "job.output.delta"]
    events = (await live.client.get(f"/v1/jobs/{job['id']}/events")).json()["data"]
    delta_events = [e for e in events if e["type"] == "job.output.delta"]
    assert len(deltas) < len(delta_events)  # several deltas per message
    text = "".join(orjson.loads(m.body)["data"]["text"] for m in deltas)
    assert text == done["output"]["choices"][0]["message"]["content"]
    gaps = [b.at - a.at for a, b in itertools.pairwise(deltas)]
    assert all(gap >= 0.4 for gap in gaps), gaps  # 500 ms apart, give or take the clock


async def test_a_disabled_endpoint_is_reported_to_the_others(
    live: LiveGateway, receiver: WebhookReceiver
) -> None:
    receiver.script("/gone", Answer(410))
    watcher = {"url": receiver.url("/watch"), "events": ["endpoint.disabled"]}
    await live.client.post("/v1/webhook-endpoints", json=watcher)
    gone = (
        await live.client.post("/v1/webhook-endpoints", json={"url": receiver.url("/gone")})
    ).json()
    await live.client.post("/v1/jobs", json=chat())
    [report] = await receiver.wait_for("/watch", 1)
    body = orjson.loads(report.body)
    assert body["type"] == "endpoint.disabled" and body["data"]["id"] == gone["id"]
    assert "410" in body["data"]["disabled_reason"]


async def test_two_senders_on_one_database_send_each_message_once(
    database_url: str, upstream: ScriptedUpstream, receiver: WebhookReceiver
) -> None:
    receiver.script("/both", Answer(200, delay=0.05))
    settings = gateway_settings(database_url, upstream.base_url)
    async with serve(settings) as first, serve(settings) as second:
        await first.client.post("/v1/webhook-endpoints", json={"url": receiver.url("/both")})
        clients = [first.client, await second.client_for("acme")]
        jobs = [
            (await clients[i % 2].post("/v1/jobs", json=chat())).json()["id"] for i in range(20)
        ]
        for job_id in jobs:
            await wait_for_status(first.client, job_id, {"succeeded"})
        await receiver.wait_for("/both", 20)
        await asyncio.sleep(0.5)
        await clients[1].aclose()
    ids = [m.id for m in receiver.at("/both")]
    assert len(ids) == len(set(ids)) == 20


async def test_a_jobs_messages_go_in_event_order_whatever_the_writers_clocks(
    database_url: str,
) -> None:
    # Two processes wrote a job's messages; the later event's writer had a clock behind, so its
    # message id (time-based) sorts first. The order is the events' seq, not the ids.
    store = await open_store(database_url)
    try:
        key = order_key(None, "http://127.0.0.1:9/hook", "job_x")
        rows = [
            {"id": "msg_2", "seq": 1, "event_type": "job.queued"},
            {"id": "msg_1", "seq": 2, "event_type": "job.succeeded"},
        ]
        values = [
            {**row, "tenant": "acme", "endpoint_id": None, "url": "http://127.0.0.1:9/hook",
             "job_id": "job_x", "payload": {}, "order_key": key, "status": "pending",
             "attempts": 0, "next_attempt_at": 0, "created_at": 0, "updated_at": 0}
            for row in rows
        ]  # fmt: skip
        await store.database.write(lambda conn: conn.execute(sa.insert(deliveries), values))
        first = await store.webhooks.claim_due(1, 10, "lease_a", 10_000, busy=())
        assert [d.id for d in first] == ["msg_2"]  # only the head of the job's queue
    finally:
        await store.close()


async def _enqueue_succeeded(store: Any, urls: list[str], now: int) -> None:
    """One job.succeeded message per URL, each for a job of its own, written to the outbox."""
    from hookline.events import Event, EventType
    from hookline.store.outbox import enqueue_deliveries

    events = [
        (Event(0, f"job_{i}", "acme", 1, EventType.SUCCEEDED, {}, now), None,
         {"url": url, "events": ["job.succeeded"]})
        for i, url in enumerate(urls)
    ]  # fmt: skip
    await store.database.write(lambda conn: enqueue_deliveries(conn, events, now))


async def test_claimed_messages_whose_lease_is_nearly_out_are_left_for_a_later_claim(
    database_url: str, receiver: WebhookReceiver
) -> None:
    """The sender's ready set never starts a POST that could outlive its message's lease (another
    process might take the message meanwhile); such messages wait for the lease to lapse."""
    from hookline.config import WebhooksConfig
    from hookline.delivery.webhooks.sender import WebhookSender
    from hookline.live.notify import Notifier

    clock = ManualClock(start_ms=1_900_000_000_000)
    store = await open_store(database_url)
    try:
        now = clock.now_ms()
        await _enqueue_succeeded(store, [receiver.url(f"/d{i % 2}") for i in range(4)], now)
        config = WebhooksConfig(allowed_networks=["127.0.0.0/8"], timeout_seconds=15)
        sender = WebhookSender(store.webhooks, config, clock, Notifier())
        # Claimed with a lease shorter than a send may take: nothing is sent.
        batch = await store.webhooks.claim_due(now, 10, "lease_short", now + 5_000, ())
        assert len(batch) == 4
        await sender._make_ready(batch)
        await asyncio.sleep(0.2)
        assert receiver.at("/d0") == [] and receiver.at("/d1") == []
        assert sender._ready_count == 0 and not sender._ready
        # Once the lease has lapsed, a sender claims and sends them.
        clock.advance(6)
        await sender.start()
        await receiver.wait_for("/d0", 2)
        await receiver.wait_for("/d1", 2)
        await sender.stop()
    finally:
        await store.close()


async def test_claims_at_once_share_the_room_instead_of_each_claiming_all_of_it(
    database_url: str, receiver: WebhookReceiver
) -> None:
    """Two claims in flight at once (the claim loop's and a recording's) must not both claim the
    room: the second would lease messages this process has no room for, only to give them back."""
    from hookline.config import WebhooksConfig
    from hookline.delivery.webhooks.sender import WebhookSender
    from hookline.live.notify import Notifier

    clock = ManualClock(start_ms=1_900_000_000_000)
    store = await open_store(database_url)
    try:
        messages = 12
        await _enqueue_succeeded(store, [receiver.url("/room")] * messages, clock.now_ms())
        config = WebhooksConfig(allowed_networks=["127.0.0.0/8"], max_in_flight=2)
        sender = WebhookSender(store.webhooks, config, clock, Notifier())
        capacity = 2 * config.max_in_flight
        gate, asked = asyncio.Event(), asyncio.Queue[int]()
        claim_due = store.webhooks.claim_due

        async def gated_claim_due(*args: Any) -> Any:
            asked.put_nowait(args[1])  # the limit
            await gate.wait()
            return await claim_due(*args)

        store.webhooks.claim_due = gated_claim_due  # type: ignore[method-assign,assignment]
        await sender.start()  # its loop claims first...
        async with asyncio.timeout(5):
            assert await asked.get() == capacity
            second = asyncio.create_task(sender._claim())  # ...and this claim runs meanwhile
            assert await asked.get() == 0
        gate.set()
        assert await second == (0, 0)
        await receiver.wait_for("/room", messages)
        await sender.stop()
    finally:
        await store.close()


@pytest.mark.parametrize("enqueued", ["after the late send", "while it is being sent"])
async def test_the_next_output_delta_message_waits_an_interval_after_a_late_send(
    database_url: str, enqueued: str
) -> None:
    """The 500 ms between a job's output delta messages count from when the last one went out,
    not from when it was due: a late send must not bring the next one closer to it."""
    from hookline.deliveries import AttemptOutcome
    from hookline.events import Event, EventType
    from hookline.store.outbox import DELTA_INTERVAL_MS, enqueue_deliveries

    store = await open_store(database_url)
    webhook = {"url": "http://127.0.0.1:9/hook", "events": ["job.output.delta"]}

    def delta(seq: int, text: str, now: int) -> list[Any]:
        data = {"attempt": 1, "index": 0, "text": text}
        return [
            (Event(0, "job_late", "acme", seq, EventType.OUTPUT_DELTA, data, now), None, webhook)
        ]

    async def enqueue(seq: int, text: str, now: int) -> None:
        await store.database.write(
            lambda conn: enqueue_deliveries(conn, delta(seq, text, now), now)
        )

    try:
        due = 1_900_000_000_000
        await enqueue(1, "a", due)
        [first] = await store.webhooks.claim_due(due, 10, "lease_1", due + 60_000, ())
        sent = due + 300  # it went out (and its outcome was recorded) 300 ms after it was due
        ok = AttemptOutcome(status_code=200, latency_ms=5, response_excerpt="ok", succeeded=True)
        if enqueued == "while it is being sent":
            await enqueue(2, "b", due + 100)
        await store.webhooks.record_attempts([(first, "lease_1", ok, sent)])
        if enqueued == "after the late send":
            await enqueue(2, "b", sent + 50)
        pending = await store.webhooks.list_deliveries("acme", status="pending", limit=10)
        assert [d.payload["data"]["text"] for d in pending] == ["b"]
        assert pending[0].next_attempt_at >= sent + DELTA_INTERVAL_MS
        # Nothing is due before then.
        assert await store.webhooks.claim_due(sent + 499, 10, "lease_2", sent + 60_000, ()) == []
    finally:
        await store.close()
