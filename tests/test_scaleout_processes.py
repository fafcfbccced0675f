"""Scale-out faults with real processes on PostgreSQL: workers and API processes killed with
SIGKILL mid-stream, workers racing for jobs under one global limit, the database restarted under
load. Every process is started on a free loopback port and always stopped."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import _service_missing
from tests.pg_cluster import PrivateCluster, postgres_binaries
from tests.processes import GatewayProcess, hookline, write_config
from tests.scripted_upstream import Reply, ScriptedUpstream, Threaded
from tests.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.fault  # part of the fault suite (docs/reliability.md)

CHAT = {
    "operation": "chat.completions",
    "model": "m",
    "input": {"messages": [{"role": "user", "content": "x"}]},
}
TEXT = "".join(f"t{i} " for i in range(40))


@pytest.fixture
def threaded_upstream() -> Iterator[ScriptedUpstream]:
    with Threaded(ScriptedUpstream()) as upstream:
        yield upstream


def _env(
    tmp_path: Path, database_url: str, upstream: ScriptedUpstream, **config: Any
) -> dict[str, str]:
    path = write_config(tmp_path / "hookline.toml", upstream.base_url, **config)
    return {"HOOKLINE_CONFIG": str(path), "HOOKLINE_DATABASE_URL": database_url}


def _api_key(env: dict[str, str]) -> str:
    created = hookline("keys", "create", "--tenant", "demo", env=env)
    assert created.returncode == 0, created.stderr
    return created.stdout.strip()


class _Processes:
    """Every process a test starts, stopped at the end whatever happens."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd
        self.started: list[GatewayProcess] = []

    def start(self, command: str) -> GatewayProcess:
        process = GatewayProcess(command, self.env, self.cwd).start()
        self.started.append(process)
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {p.command} {p.port}\n{p.log.read_text()}" for p in self.started)

    def stop(self) -> None:
        for process in self.started:
            process.stop()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[_Processes]]:
    made: list[_Processes] = []
    yield made
    for group in made:
        group.stop()


def _stream_lines(
    client: httpx.Client, url: str, headers: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """The SSE messages of ``url`` as {"id", "event", "data"} (data parsed)."""
    fields: dict[str, str] = {}
    with client.stream(
        "GET", url, headers={"Accept": "text/event-stream", **(headers or {})}
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line == "" and fields:
                yield {
                    "id": fields.get("id"),
                    "event": fields.get("event"),
                    "data": json.loads(fields["data"]),
                }
                fields = {}
            elif line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")


def test_a_worker_killed_mid_stream_is_taken_over_and_the_stream_follows(
    tmp_path: Path,
    postgres_url: str,
    threaded_upstream: ScriptedUpstream,
    processes: list[_Processes],
) -> None:
    threaded_upstream.script(
        "m", Reply(text=TEXT, chunks=40, token_delay=0.1), Reply(text=TEXT, chunks=8)
    )
    env = _env(tmp_path, postgres_url, threaded_upstream, lease_seconds=1)
    group = _Processes(env, tmp_path)
    processes.append(group)
    api = group.start("api")
    first_worker = group.start("worker")
    headers = {"Authorization": f"Bearer {_api_key(env)}"}
    seen: list[dict[str, Any]] = []
    with httpx.Client(base_url=api.url, headers=headers, timeout=30) as client:
        job = client.post("/v1/jobs", json=CHAT).json()
        for message in _stream_lines(client, f"/v1/jobs/{job['id']}/events"):
            seen.append(message)
            deltas = [m for m in seen if m["event"] == "job.output.delta"]
            if len(deltas) == 5 and first_worker.process and first_worker.process.poll() is None:
                first_worker.kill()  # mid-stream, no chance to clean up
                group.start("worker")
        final = client.get(f"/v1/jobs/{job['id']}").json()
        events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert seen[-1]["event"] == "job.succeeded", group.logs()
    assert final["status"] == "succeeded" and final["attempts"] == 2
    assert final["output"]["choices"][0]["message"]["content"] == TEXT  # whole, not mixed
    starts = [m["data"]["data"]["attempt"] for m in seen if m["event"] == "job.started"]
    assert starts == [1, 2]
    # The stream showed the abandoned attempt's text marked as attempt 1; the new attempt's text
    # alone is the output.
    by_attempt: dict[int, str] = {1: "", 2: ""}
    for message in seen:
        if message["event"] == "job.output.delta":
            delta = message["data"]["data"]
            by_attempt[delta["attempt"]] += delta["text"]
    assert by_attempt[2] == TEXT
    assert TEXT.startswith(by_attempt[1]) and by_attempt[1]
    terminal = [e for e in events if e["type"] in {"job.succeeded", "job.failed", "job.cancelled"}]
    assert len(terminal) == 1


def test_an_api_process_killed_mid_stream_the_client_resumes_on_another(
    tmp_path: Path,
    postgres_url: str,
    threaded_upstream: ScriptedUpstream,
    processes: list[_Processes],
) -> None:
    threaded_upstream.script("m", Reply(text=TEXT, chunks=40, token_delay=0.05))
    # Output is written only every 30 s: what either API process streams before the end came
    # live from the worker process, through PostgreSQL.
    env = _env(tmp_path, postgres_url, threaded_upstream, delta_flush_seconds=30)
    group = _Processes(env, tmp_path)
    processes.append(group)
    first_api, second_api = group.start("api"), group.start("api")
    group.start("worker")
    headers = {"Authorization": f"Bearer {_api_key(env)}"}
    text = ""
    last_id = None
    with httpx.Client(base_url=first_api.url, headers=headers, timeout=30) as client:
        job = client.post("/v1/jobs", json=CHAT).json()
        try:
            for message in _stream_lines(client, f"/v1/jobs/{job['id']}/events"):
                last_id = message["id"]
                if message["event"] == "job.output.delta":
                    text += message["data"]["data"]["text"]
                    if len(text) >= 20:
                        first_api.kill()
        except httpx.HTTPError:
            pass  # the process died under the stream
    assert 20 <= len(text) < len(TEXT), "the stream should have been cut mid-way"
    ended = None
    with httpx.Client(base_url=second_api.url, headers=headers, timeout=30) as client:
        url = f"/v1/jobs/{job['id']}/events"
        live_after_resume = 0
        for message in _stream_lines(client, url, {"Last-Event-ID": str(last_id)}):
            if message["event"] == "job.output.delta":
                text += message["data"]["data"]["text"]
                live_after_resume += message["data"]["seq"] is None
            ended = message["event"]
    assert ended == "job.succeeded", group.logs()
    assert text == TEXT  # not a character lost or repeated across the two processes
    assert live_after_resume, "the second API process never streamed live text"


def test_workers_racing_for_jobs_run_each_once_within_the_global_limit(
    tmp_path: Path,
    postgres_url: str,
    threaded_upstream: ScriptedUpstream,
    processes: list[_Processes],
) -> None:
    threaded_upstream.script("m", Reply(first_token_delay=0.01, chunks=2))
    env = _env(tmp_path, postgres_url, threaded_upstream, max_concurrency=3)
    group = _Processes(env, tmp_path)
    processes.append(group)
    api = group.start("api")
    for _ in range(3):
        group.start("worker")
    headers = {"Authorization": f"Bearer {_api_key(env)}"}
    events = ["job.queued", "job.started", "job.succeeded"]
    with Threaded(WebhookReceiver()) as receiver:
        with httpx.Client(base_url=api.url, headers=headers, timeout=30) as client:
            body = {**CHAT, "webhook": {"url": receiver.url(), "events": events}}
            ids = [client.post("/v1/jobs", json=body).json()["id"] for _ in range(200)]
            statuses = [
                client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()["status"]
                for job_id in ids
            ]
        deadline = time.monotonic() + 30
        while len(receiver.at("/hook")) < 600 and time.monotonic() < deadline:
            time.sleep(0.1)
        received = receiver.at("/hook")
    assert statuses == ["succeeded"] * 200, group.logs()
    # Three senders, each message sent once (no failures here, so no retries), and each job's
    # messages in the order of its events.
    assert len(received) == 600 and len({r.id for r in received}) == 600
    per_job: dict[str, list[str]] = {}
    for request in received:
        message = json.loads(request.body)
        per_job.setdefault(message["data"]["id"], []).append(message["type"])
    assert all(types == events for types in per_job.values()), per_job
    assert threaded_upstream.counts["m"] == 200  # no job called the upstream twice
    assert threaded_upstream.max_active <= 3  # 3 workers, one limit of 3 between them

    async def started_per_job() -> Counter[int]:
        conn = await asyncpg.connect(postgres_url, timeout=5)
        try:
            rows = await conn.fetch(
                "SELECT job_id, count(*) AS n FROM events WHERE type = 'job.started' GROUP BY job_id"
            )
        finally:
            await conn.close()
        return Counter(row["n"] for row in rows)

    assert asyncio.run(started_per_job()) == Counter({1: 200})


def test_a_postgresql_restart_under_load_loses_nothing(
    tmp_path: Path, threaded_upstream: ScriptedUpstream, processes: list[_Processes]
) -> None:
    binaries = postgres_binaries()
    if binaries is None:
        _service_missing("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
        return
    cluster = PrivateCluster(binaries).create()
    try:
        with Threaded(WebhookReceiver()) as receiver:
            _restart_under_load(tmp_path, cluster, threaded_upstream, receiver, processes)
    finally:
        cluster.destroy()


def _restart_under_load(
    tmp_path: Path,
    cluster: PrivateCluster,
    upstream: ScriptedUpstream,
    receiver: WebhookReceiver,
    processes: list[_Processes],
) -> None:
    upstream.script("m", Reply(first_token_delay=0.02, chunks=2))
    env = _env(tmp_path, cluster.url, upstream)
    assert hookline("migrate", env=env).returncode == 0
    group = _Processes(env, tmp_path)
    processes.append(group)
    api = group.start("api")
    group.start("worker")
    headers = {"Authorization": f"Bearer {_api_key(env)}"}
    accepted: list[str] = []
    answers: Counter[int] = Counter()
    stop = threading.Event()

    def load() -> None:
        # Never a hang: a submit that takes over 10 s fails the test (the timeout raises).
        with httpx.Client(base_url=api.url, headers=headers, timeout=10) as client:
            while not stop.is_set():
                body = {**CHAT, "webhook": {"url": receiver.url()}}
                key = {"Idempotency-Key": uuid.uuid4().hex}
                response = client.post("/v1/jobs", json=body, headers=key)
                answers[response.status_code] += 1
                if response.status_code == 202:
                    accepted.append(response.json()["id"])
                else:
                    assert response.status_code == 503, response.text
                    assert response.headers["content-type"] == "application/problem+json"
                    time.sleep(0.05)

    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            load()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=guarded)
    thread.start()
    try:
        time.sleep(1.5)
        before = len(accepted)
        cluster.stop()
        time.sleep(2)
        cluster.start()
        deadline = time.monotonic() + 30
        while len(accepted) < before + 20 and time.monotonic() < deadline and not errors:
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(30)
    assert not errors, f"{errors[0]!r}\n{group.logs()}"
    assert answers[503] > 0, "the database outage was never seen"
    assert len(accepted) >= before + 20, f"no recovery after the restart: {answers}\n{group.logs()}"
    with httpx.Client(base_url=api.url, headers=headers, timeout=30) as client:
        statuses = Counter(
            client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()["status"]
            for job_id in accepted
        )
    assert statuses == Counter({"succeeded": len(accepted)}), group.logs()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        delivered = {json.loads(r.body)["data"]["id"] for r in receiver.at("/hook")}
        if set(accepted) <= delivered:
            break
        time.sleep(0.2)
    assert set(accepted) <= delivered, f"{len(set(accepted) - delivered)} webhooks never arrived"
