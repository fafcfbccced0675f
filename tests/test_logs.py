"""Structured logs: a real ``hookline serve --log-format json`` at debug level through a run with
successes, a retry, a failure, a dead-lettered webhook, secret rotation and a refused key. Every
line is a JSON object; the events carry their job's fields; and nowhere in the whole log is an
API key, a signing secret, an upstream's key, an Authorization header or a job's input."""

from __future__ import annotations

import contextvars
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hookline.observability.logs import JsonFormatter, TextFormatter, bind
from tests.processes import GatewayProcess, hookline, write_config
from tests.scripted_upstream import Reply, ScriptedUpstream, Status, Threaded
from tests.webhook_receiver import Answer, WebhookReceiver

UPSTREAM_KEY = "sk-upstream-very-secret-0123456789"
INPUT_TEXT = "my private question about a confidential matter"


@pytest.fixture
def threaded_upstream() -> Iterator[ScriptedUpstream]:
    with Threaded(ScriptedUpstream()) as upstream:
        yield upstream


@pytest.fixture
def threaded_receiver() -> Iterator[WebhookReceiver]:
    with Threaded(WebhookReceiver()) as receiver:
        yield receiver


def chat(model: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": INPUT_TEXT}]
    return {"operation": "chat.completions", "model": model, "input": {"messages": messages},
            **extra}  # fmt: skip


def wait_for(client: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", params={"wait": 1}).json()
        if job["status"] in ("succeeded", "failed"):
            return job
    raise AssertionError(f"job {job_id} did not finish")


def test_a_full_run_logs_json_and_no_secret(
    tmp_path: Path, threaded_upstream: ScriptedUpstream, threaded_receiver: WebhookReceiver
) -> None:
    threaded_upstream.script("refused", Status(400))
    threaded_upstream.script("flaky", Status(503), Reply())
    threaded_receiver.script("/dead", Answer(500))
    config = write_config(tmp_path / "hookline.toml", threaded_upstream.base_url)
    text = config.read_text().replace(
        "[webhooks]\n", "[webhooks]\nretry_schedule_seconds = [0.1]\n"
    )
    config.write_text(text + f'api_key = "{UPSTREAM_KEY}"\n')  # (the last section: the upstream)
    env = {"HOOKLINE_CONFIG": str(config), "HOOKLINE_DATABASE_URL": f"sqlite:///{tmp_path}/h.db",
           "HOOKLINE_LOG_FORMAT": "json", "HOOKLINE_LOG_LEVEL": "debug"}  # fmt: skip
    key = hookline("keys", "create", "--tenant", "demo", env=env).stdout.strip()
    assert key.startswith("hk_")
    server = GatewayProcess("serve", env, tmp_path)
    secrets: list[str] = []
    try:
        server.start()
        headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "idem-1"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            endpoint = client.post("/v1/webhook-endpoints",
                                   json={"url": threaded_receiver.url("/hook")}).json()  # fmt: skip
            path = f"/v1/webhook-endpoints/{endpoint['id']}/secret"
            secrets.append(client.get(path).json()["secret"])
            secrets.append(client.post(f"{path}/rotate").json()["secret"])
            secrets.append(client.get("/v1/webhook-secret").json()["secret"])
            jobs = [client.post("/v1/jobs", json=chat(model), headers={"Idempotency-Key": model}).json()
                    for model in ("m", "refused", "flaky")]  # fmt: skip
            dead = client.post("/v1/jobs", headers={"Idempotency-Key": "dead"},
                               json=chat("m", webhook={"url": threaded_receiver.url("/dead")}))  # fmt: skip
            jobs.append(dead.json())
            ended = {job["id"]: wait_for(client, job["id"])["status"] for job in jobs}
            assert list(ended.values()) == ["succeeded", "failed", "succeeded", "succeeded"]
            deadline = time.monotonic() + 30
            while not client.get("/v1/deliveries", params={"status": "failed"}).json()["data"]:
                assert time.monotonic() < deadline, "the webhook was never given up on"
                time.sleep(0.1)
            assert (
                httpx.get(
                    f"{server.url}/v1/jobs", headers={"Authorization": "Bearer hk_wrongwrongwrong"}
                ).status_code
                == 401
            )
        server.terminate()
    finally:
        server.stop()

    lines = [line for line in server.log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
    by_message: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_message.setdefault(record["message"], []).append(record)
    [succeeded] = [r for r in by_message["job succeeded"] if r["job_id"] == jobs[0]["id"]]
    assert succeeded["tenant"] == "demo" and succeeded["upstream"] == "scripted"
    assert succeeded["attempt"] == 1 and succeeded["status"] == "succeeded"
    assert succeeded["level"] == "info" and succeeded["logger"] == "hookline.jobs"
    [failed] = [r for r in records if r.get("status") == "failed"]
    assert failed["job_id"] == jobs[1]["id"] and failed["error"] == "upstream_error"
    [retry] = [r for r in records if r["message"].startswith("attempt failed; retrying")]
    assert retry["job_id"] == jobs[2]["id"] and retry["level"] == "warning"
    [given_up] = [r for r in records if "dead letter" in r["message"]]
    assert given_up["job_id"] == jobs[3]["id"] and given_up["status_code"] == 500
    assert given_up["level"] == "warning" and given_up["delivery_id"].startswith("msg_")
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's lines too

    log = server.log.read_text()
    for secret in [key, key[3:], *secrets, *(s.removeprefix("whsec_") for s in secrets),
                   UPSTREAM_KEY, INPUT_TEXT, "hk_wrongwrongwrong"]:  # fmt: skip
        assert secret not in log
    assert "bearer" not in log.lower() and "authorization" not in log.lower()


def test_text_lines_carry_the_fields_too() -> None:
    import logging

    record = logging.LogRecord("hookline.jobs", logging.INFO, __file__, 1, "job %s", ("done",),
                               None)  # fmt: skip
    record.job_id, record.tenant = "job_1", "acme corp"
    line = TextFormatter().format(record)
    assert line.endswith('hookline.jobs: job done job_id=job_1 tenant="acme corp"')

    def in_a_job_task() -> str:
        bind(upstream="scripted", attempt=2)  # as the worker does in the task of a job
        return JsonFormatter().format(record)

    parsed = json.loads(contextvars.copy_context().run(in_a_job_task))
    assert parsed["upstream"] == "scripted" and parsed["attempt"] == 2
    assert parsed["job_id"] == "job_1" and parsed["message"] == "job done"
