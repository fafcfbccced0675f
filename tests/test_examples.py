"""The examples: the receivers accept hookline's signed messages, and every example runs as its
docstring says, as a command, against a real ``hookline serve --dev``."""

from __future__ import annotations

import ast
import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from examples import (
    batch,
    by_hand_polling,
    openai_sdk,
    receiver_django,
    receiver_fastapi,
    receiver_flask,
    stream_with_resume,
    submit_and_webhook,
)
from werkzeug.serving import make_server

from tests.conftest import LiveGateway, wait_for_status
from tests.shell import ROOT, Terminal, gateway_terminal

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


# --- each example as its docstring says to run it, against a real `hookline serve --dev`


def docstring_commands(example: Path) -> list[str]:
    """The commands in the example's docstring: its lines indented by four spaces."""
    text = ast.get_docstring(ast.parse(example.read_text()), clean=True) or ""
    return [line.strip() for line in text.splitlines() if line.startswith("    ")]


EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if p.name != "__init__.py")
RECEIVERS = ["receiver_fastapi.py", "receiver_flask.py", "receiver_django.py"]
# What each example prints when it works (the scripted upstream echoes the last message).
PRINTS = {
    "stream_with_resume.py": "echo: Tell me a short story.",
    "batch.py": "q1: echo: Capital of France?",
    "openai_sdk.py": "echo: Say hello.",
}


def test_every_example_says_how_to_run_it() -> None:
    runnable = {p.name for p in EXAMPLES if docstring_commands(p)}
    # Two are read rather than run: by_hand_polling.py is a comparison (docs/client.md, run by
    # test_by_hand_polling), sink_consumers.py a module of consumers (docs/sinks.md, run by
    # tests/test_sinks.py against the real brokers).
    assert runnable | {"by_hand_polling.py", "sink_consumers.py"} == {p.name for p in EXAMPLES}
    assert set(RECEIVERS) | set(PRINTS) | {"submit_and_webhook.py"} == runnable


def _until(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the checkout's folder, as it were
    with gateway_terminal(tmp_path) as terminal:
        made = terminal.run(
            "export HOOKLINE_API_KEY=$(.venv/bin/hookline keys create --tenant demo)"
        )
        assert made.returncode == 0, made.stderr
        yield terminal


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_a_receiver_run_as_written_gets_the_webhook_sent_as_written(
    terminal: Terminal, receiver: str
) -> None:
    [serve] = docstring_commands(ROOT / "examples" / receiver)
    [send] = docstring_commands(ROOT / "examples" / "submit_and_webhook.py")
    process, log = terminal.start(f"{serve}")
    port = terminal.receiver_port
    _until(lambda: _listening(port), f"{receiver} never listened:\n{log.read_text()}")
    sent = terminal.run(send)
    assert sent.returncode == 0, sent.stderr
    job_id = sent.stdout.split()[1].rstrip(";")
    _until(
        lambda: f"verified job.succeeded of {job_id}" in log.read_text(),
        f"{receiver} got no verified webhook:\n{log.read_text()}",
    )
    assert process.poll() is None


@pytest.mark.parametrize("example", sorted(PRINTS))
def test_an_example_run_as_written_prints_its_answer(terminal: Terminal, example: str) -> None:
    [command] = docstring_commands(ROOT / "examples" / example)
    ran = terminal.run(command)
    assert ran.returncode == 0, ran.stderr
    assert PRINTS[example] in ran.stdout


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_by_hand_polling(live: LiveGateway) -> None:
    # The comparison's code works against any OpenAI-compatible server: hookline's facade is one.
    done: list[dict[str, Any]] = []
    body = {"model": "m", "messages": [{"role": "user", "content": "by hand"}]}
    thread = by_hand_polling.submit(f"{live.base_url}/v1", live.api_key, body, done.append, print)
    await asyncio.to_thread(thread.join, 30)
    assert done[0]["choices"][0]["message"]["content"] == "echo: by hand"
