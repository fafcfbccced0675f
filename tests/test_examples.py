"""The receivers in examples/ run against a live hookline and accept its signed messages."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from examples import (
    batch,
    openai_sdk,
    receiver_django,
    receiver_fastapi,
    receiver_flask,
    stream_with_resume,
    submit_and_webhook,
)
from werkzeug.serving import make_server

from tests.conftest import LiveGateway, wait_for_status

CHAT = {
    "operation": "chat.completions",
    "model": "m",
    "input": {"messages": [{"role": "user", "content": "hi"}]},
}


@pytest.fixture
def flask_url() -> Iterator[str]:
    server = make_server("127.0.0.1", 0, receiver_flask.app)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()
    thread.join(5)


async def _roundtrip(
    live: LiveGateway, url: str, received: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = (await live.client.get("/v1/webhook-secret")).json()["secret"]
    monkeypatch.setenv("HOOKLINE_WEBHOOK_SECRET", secret)
    received.clear()
    job = (await live.client.post("/v1/jobs", json={**CHAT, "webhook": {"url": url}})).json()
    await wait_for_status(live.client, job["id"], {"succeeded"})
    for _ in range(200):
        if received:
            break
        await asyncio.sleep(0.02)
    [event] = received
    assert event.type == "job.succeeded" and event.data["id"] == job["id"]
    deliveries = (await live.client.get("/v1/deliveries", params={"job_id": job["id"]})).json()[
        "data"
    ]
    assert deliveries[0]["status"] == "succeeded"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_fastapi_receiver(live: LiveGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(receiver_fastapi.app, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
            await asyncio.sleep(0.01)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
        await _roundtrip(live, url, receiver_fastapi.received, monkeypatch)
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_flask_receiver(
    live: LiveGateway, flask_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _roundtrip(live, flask_url, receiver_flask.received, monkeypatch)


def test_receivers_refuse_a_bad_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    monkeypatch.setenv("HOOKLINE_WEBHOOK_SECRET", "whsec_" + "A" * 43 + "=")
    headers = {"webhook-id": "msg_1", "webhook-timestamp": "1", "webhook-signature": "v1,AAAA"}
    response = TestClient(receiver_fastapi.app).post("/hook", content=b"{}", headers=headers)
    assert response.status_code == 400
    assert (
        receiver_flask.app.test_client().post("/hook", data=b"{}", headers=headers).status_code
        == 400
    )


@pytest.fixture
def django_url() -> Iterator[str]:
    server = make_server("127.0.0.1", 0, receiver_django.application)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()
    thread.join(5)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_django_receiver(
    live: LiveGateway, django_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _roundtrip(live, django_url, receiver_django.received, monkeypatch)


@pytest.fixture
def client_env(live: LiveGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOKLINE_URL", live.base_url)
    monkeypatch.setenv("HOOKLINE_API_KEY", live.api_key)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_submit_and_webhook_example(
    live: LiveGateway, flask_url: str, client_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = (await live.client.get("/v1/webhook-secret")).json()["secret"]
    monkeypatch.setenv("HOOKLINE_WEBHOOK_SECRET", secret)
    receiver_flask.received.clear()
    job_id = await asyncio.to_thread(submit_and_webhook.main, flask_url, "m")
    for _ in range(300):
        if receiver_flask.received:
            break
        await asyncio.sleep(0.02)
    [event] = receiver_flask.received
    assert event.type == "job.succeeded" and event.data["id"] == job_id


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_stream_batch_and_openai_examples(live: LiveGateway, client_env: None) -> None:
    streamed = await asyncio.to_thread(stream_with_resume.main, "m", "once upon a time")
    assert streamed == "echo: once upon a time"
    answers = await asyncio.to_thread(batch.main, "m", ("one", "two"))
    assert answers == {"q0": "echo: one", "q1": "echo: two"}
    said = await asyncio.to_thread(openai_sdk.main, "m")
    assert said == "echo: Say hello."
