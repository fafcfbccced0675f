"""The CLI and real processes: what a new user does, end to end."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from hookline.live.relay import relay_directory
from tests.processes import GatewayProcess, hookline, write_config
from tests.scripted_upstream import Hang, Reply, ScriptedUpstream, Threaded
from tests.webhook_receiver import Answer, WebhookReceiver

CHAT = {
    "operation": "chat.completions",
    "model": "m",
    "input": {"messages": [{"role": "user", "content": "x"}]},
}


@pytest.fixture
def threaded_upstream() -> Iterator[ScriptedUpstream]:
    with Threaded(ScriptedUpstream()) as upstream:
        yield upstream


@pytest.fixture
def env(tmp_path: Path, threaded_upstream: ScriptedUpstream) -> dict[str, str]:
    config = write_config(tmp_path / "hookline.toml", threaded_upstream.base_url, max_concurrency=2)
    return {
        "HOOKLINE_CONFIG": str(config),
        "HOOKLINE_DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}",
    }


def test_keys_submit_wait_list_show(tmp_path: Path, env: dict[str, str]) -> None:
    server = GatewayProcess("serve", env, tmp_path)
    try:
        server.start()
        created = hookline("keys", "create", "--tenant", "demo", env=env)
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        assert key.startswith("hk_")
        client_env = {**env, "HOOKLINE_URL": server.url, "HOOKLINE_API_KEY": key}

        answer = hookline("submit", "--model", "m", "-m", "Hello CLI", "--wait", env=client_env)
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.strip() == "echo: Hello CLI"

        job_file = tmp_path / "job.json"
        job_file.write_text(
            json.dumps({"operation": "completions", "model": "m", "input": {"prompt": "p"}})
        )
        raw = hookline("submit", "-f", str(job_file), "--wait", "--json", env=client_env)
        job = json.loads(raw.stdout)
        assert job["status"] == "succeeded" and job["output"]["choices"][0]["text"] == "echo: p"

        image = hookline(
            "submit", "-o", "images.generations", "--model", "m", "--prompt", "a cat",
            "--wait", "--json", env=client_env,
        )  # fmt: skip
        assert image.returncode == 0, image.stderr
        assert json.loads(image.stdout)["output"]["data"], image.stdout
        declared = hookline("submit", "-o", "rerank", "--model", "m", env=client_env)
        assert declared.returncode == 2 and "--file" in declared.stderr

        listed = json.loads(hookline("jobs", "list", "--json", env=client_env).stdout)
        assert listed["data"][1]["id"] == job["id"] and len(listed["data"]) == 3
        table = hookline("jobs", "list", env=client_env)
        assert job["id"] in table.stdout and "succeeded" in table.stdout
        shown = hookline("jobs", "show", job["id"], env=client_env)
        assert shown.returncode == 0 and "echo: p" in shown.stdout

        missing = hookline("jobs", "show", "job_missing", env=client_env)
        assert missing.returncode == 1 and "404" in missing.stderr
        no_key = hookline(
            "jobs", "list", env={**env, "HOOKLINE_URL": server.url, "HOOKLINE_API_KEY": ""}
        )
        assert no_key.returncode == 2 and "keys create" in no_key.stderr
        bad_tenant = hookline("keys", "create", "--tenant", "no spaces", env=env)
        assert bad_tenant.returncode == 2 and "tenant" in bad_tenant.stderr
    finally:
        server.stop()


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[[upstreams]]\nname = "x"\ntype = "openai"\n')
    result = hookline("serve", "--config", str(config))
    assert result.returncode == 2 and "base_url" in result.stderr
    result = hookline("serve", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "not found" in result.stderr


def test_restart_with_100_queued_jobs_finishes_them_all(
    tmp_path: Path, env: dict[str, str], threaded_upstream: ScriptedUpstream
) -> None:
    threaded_upstream.script("m", Hang(60))
    key = hookline("keys", "create", "--tenant", "demo", env=env).stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}
    first = GatewayProcess("serve", env, tmp_path)
    try:
        first.start()
        with httpx.Client(base_url=first.url, headers=headers) as client:
            ids = [client.post("/v1/jobs", json=CHAT).json()["id"] for _ in range(100)]
        first.terminate()
    finally:
        first.stop()

    threaded_upstream.script("m", Reply())
    second = GatewayProcess("serve", env, tmp_path)
    try:
        second.start()
        with httpx.Client(base_url=second.url, headers=headers, timeout=30) as client:
            statuses = [
                client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()["status"]
                for job_id in ids
            ]
            attempts = [client.get(f"/v1/jobs/{job_id}").json()["attempts"] for job_id in ids]
    finally:
        second.stop()
    assert statuses == ["succeeded"] * 100
    assert attempts == [1] * 100


def test_api_and_worker_as_separate_processes(tmp_path: Path, env: dict[str, str]) -> None:
    assert hookline("migrate", env=env).returncode == 0  # as docs/recipes.md runs them
    key = hookline("keys", "create", "--tenant", "demo", env=env).stdout.strip()
    api = GatewayProcess("api", env, tmp_path, args=("--no-migrate",))
    worker = GatewayProcess("worker", env, tmp_path, args=("--no-migrate",))
    try:
        api.start()
        with httpx.Client(
            base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as client:
            job = client.post("/v1/jobs", json=CHAT).json()
            assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
            worker.start()
            done = client.get(f"/v1/jobs/{job['id']}", params={"wait": 20}).json()
        assert done["status"] == "succeeded"
        assert done["output"]["choices"][0]["message"]["content"] == "echo: x"
        worker.terminate()
    finally:
        api.stop()
        worker.stop()


def test_live_output_crosses_from_a_worker_process_to_the_api_process(
    tmp_path: Path, env: dict[str, str], threaded_upstream: ScriptedUpstream
) -> None:
    # Output is written to the database only every 30 s here: a stream served by the api process
    # that sees it chunk by chunk got it from the worker process over the live relay.
    config = write_config(
        tmp_path / "relay.toml", threaded_upstream.base_url, delta_flush_seconds=30
    )
    env = {**env, "HOOKLINE_CONFIG": str(config)}
    text = "".join(f"r{i} " for i in range(30))
    threaded_upstream.script(
        "m", Reply(text=text, chunks=30, first_token_delay=2.5, token_delay=0.03)
    )
    assert hookline("migrate", env=env).returncode == 0
    key = hookline("keys", "create", "--tenant", "demo", env=env).stdout.strip()
    api = GatewayProcess("api", env, tmp_path)
    worker = GatewayProcess("worker", env, tmp_path)
    try:
        api.start()
        worker.start()
        # The worker serves its live output on a socket once it has started; the api process
        # looks for new ones every half second.
        sockets = relay_directory(env["HOOKLINE_DATABASE_URL"].removeprefix("sqlite:///"))
        deadline = time.monotonic() + 60
        while not list(sockets.glob("*.sock")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(sockets.glob("*.sock")), "the worker process never served its live relay"
        # The api process looks for sockets every half second: wait until it follows this one.
        while "live relay: following" not in api.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "live relay: following" in api.log.read_text(), api.log.read_text()
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=api.url, headers=headers, timeout=30) as client:
            job = client.post("/v1/jobs", json=CHAT).json()
            deltas = []
            with client.stream(
                "GET", f"/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"}
            ) as stream:
                for line in stream.iter_lines():
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        if event["type"] == "job.output.delta":
                            deltas.append(event)
        assert "".join(d["data"]["text"] for d in deltas) == text
        live = [d for d in deltas if d["seq"] is None]
        assert len(live) >= 5, (  # written only at the end: all of these came live
            f"only {len(live)} of {len(deltas)} deltas came live;\napi log:\n"
            f"{api.log.read_text()}\nworker log:\n{worker.log.read_text()}"
        )
    finally:
        api.stop()
        worker.stop()


def test_a_crashed_gateway_loses_no_job(
    tmp_path: Path, env: dict[str, str], threaded_upstream: ScriptedUpstream
) -> None:
    env = {
        **env,
        "HOOKLINE_CONFIG": str(
            write_config(tmp_path / "crash.toml", threaded_upstream.base_url, lease_seconds=1)
        ),
    }
    threaded_upstream.script("m", Hang(60))
    key = hookline("keys", "create", "--tenant", "demo", env=env).stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}
    first = GatewayProcess("serve", env, tmp_path)
    try:
        first.start()
        with httpx.Client(base_url=first.url, headers=headers) as client:
            running = client.post("/v1/jobs", json=CHAT).json()["id"]
            queued = [client.post("/v1/jobs", json=CHAT).json()["id"] for _ in range(5)]
            deadline = time.monotonic() + 10
            while client.get(f"/v1/jobs/{running}").json()["status"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
        first.kill()
    finally:
        first.stop()

    threaded_upstream.script("m", Reply())
    second = GatewayProcess("serve", env, tmp_path)
    try:
        second.start()
        with httpx.Client(base_url=second.url, headers=headers, timeout=30) as client:
            jobs = [
                client.get(f"/v1/jobs/{job_id}", params={"wait": 20}).json()
                for job_id in [running, *queued]
            ]
            events = client.get(f"/v1/jobs/{running}/events").json()["data"]
    finally:
        second.stop()
    assert [job["status"] for job in jobs] == ["succeeded"] * 6
    assert jobs[0]["attempts"] == 2  # the crashed attempt counts
    assert [e["type"] for e in events].count("job.succeeded") == 1
    assert any("stopped renewing its lease" in e["data"].get("message", "") for e in events)


def test_a_webhook_interrupted_by_a_crash_is_sent_after_restart(
    tmp_path: Path, env: dict[str, str], threaded_upstream: ScriptedUpstream
) -> None:
    config = write_config(
        tmp_path / "hooks.toml", threaded_upstream.base_url, webhook_timeout_seconds=1
    )
    env = {**env, "HOOKLINE_CONFIG": str(config)}
    key = hookline("keys", "create", "--tenant", "demo", env=env).stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}
    with Threaded(WebhookReceiver()) as receiver:
        receiver.script("/hook", Answer(200, delay=30))  # the receiver gets it; no answer is stored
        first = GatewayProcess("serve", env, tmp_path)
        try:
            first.start()
            with httpx.Client(base_url=first.url, headers=headers) as client:
                job = client.post(
                    "/v1/jobs", json={**CHAT, "webhook": {"url": receiver.url()}}
                ).json()
            deadline = time.monotonic() + 20
            while not receiver.started:
                assert time.monotonic() < deadline, "the message was never sent"
                time.sleep(0.02)
            first.kill()  # mid-send
        finally:
            first.stop()
        receiver.script("/hook", Answer(200))
        second = GatewayProcess("serve", env, tmp_path)
        try:
            second.start()
            deadline = time.monotonic() + 30
            while len(receiver.at("/hook")) < 2:
                assert time.monotonic() < deadline, "the message was not sent again"
                time.sleep(0.05)
            with httpx.Client(base_url=second.url, headers=headers) as client:
                [delivery] = client.get("/v1/deliveries", params={"job_id": job["id"]}).json()[
                    "data"
                ]
        finally:
            second.stop()
    first_try, second_try = receiver.at("/hook")
    assert first_try.id == second_try.id == delivery["id"]  # the same webhook-id: receivers dedupe
    assert delivery["status"] == "succeeded"


def test_batch_submit_wait_and_results(tmp_path: Path, env: dict[str, str]) -> None:
    lines = [
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "m", "messages": [{"role": "user", "content": f"n{i}"}]}})
        for i in range(6)
    ]  # fmt: skip
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    key = hookline("keys", "create", "--tenant", "demo", env=env).stdout.strip()
    server = GatewayProcess("serve", env, tmp_path)
    try:
        server.start()
        client_env = {**env, "HOOKLINE_URL": server.url, "HOOKLINE_API_KEY": key}
        submitted = hookline("batch", "submit", str(source), "--wait", env=client_env)
        assert submitted.returncode == 0, submitted.stderr
        batch_id = submitted.stdout.split()[0]
        assert "completed: 6 completed, 0 failed of 6" in submitted.stdout
        out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
        results = hookline(
            "batch", "results", batch_id, "-o", str(out), "--errors", str(errors), env=client_env
        )
        assert results.returncode == 0, results.stderr
        written = [json.loads(line) for line in out.read_text().splitlines()]
        assert [line["custom_id"] for line in written] == [f"r{i}" for i in range(6)]
        assert errors.read_text() == ""
        bad = tmp_path / "bad.jsonl"
        bad.write_text(lines[0] + "\n" + lines[0] + "\n")
        rejected = hookline("batch", "submit", str(bad), env=client_env)
        assert rejected.returncode == 1 and "line 2" in rejected.stderr
    finally:
        server.stop()


def test_a_batch_survives_a_crash_midway(
    tmp_path: Path, env: dict[str, str], threaded_upstream: ScriptedUpstream
) -> None:
    config = write_config(tmp_path / "crash.toml", threaded_upstream.base_url, lease_seconds=1)
    config.write_text(config.read_text() + "\n[batches]\nlease_seconds = 1\npoll_seconds = 0.1\n")
    env = {**env, "HOOKLINE_CONFIG": str(config)}
    threaded_upstream.script("m", Reply(first_token_delay=0.1))
    lines = "".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "m", "messages": [{"role": "user", "content": f"n{i}"}]}})
        + "\n"
        for i in range(20)
    )  # fmt: skip
    key = hookline("keys", "create", "--tenant", "demo", env=env).stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}
    first = GatewayProcess("serve", env, tmp_path)
    try:
        first.start()
        with httpx.Client(base_url=first.url, headers=headers, timeout=30) as client:
            batch = client.post(
                "/v1/batches", content=lines, headers={"Content-Type": "application/jsonl"}
            ).json()
            deadline = time.monotonic() + 20
            while (
                client.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["completed"] < 3
            ):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        first.kill()  # mid-batch, items in flight
    finally:
        first.stop()
    second = GatewayProcess("serve", env, tmp_path)
    try:
        second.start()
        with httpx.Client(base_url=second.url, headers=headers, timeout=30) as client:
            deadline = time.monotonic() + 60
            while (done := client.get(f"/v1/batches/{batch['id']}").json())[
                "status"
            ] != "completed":
                assert time.monotonic() < deadline, done
                time.sleep(0.1)
            output = client.get(f"/v1/files/{done['output_file_id']}/content").text
    finally:
        second.stop()
    results = [json.loads(line) for line in output.splitlines()]
    assert [r["custom_id"] for r in results] == [f"r{i}" for i in range(20)]  # each once, in order
    assert done["request_counts"] == {"total": 20, "completed": 20, "failed": 0}


def test_listen_forwards_signed_events_and_resumes(
    tmp_path: Path, env: dict[str, str], threaded_upstream: ScriptedUpstream
) -> None:
    key = hookline("keys", "create", "--tenant", "demo", env=env).stdout.strip()
    server = GatewayProcess("serve", env, tmp_path)
    state = tmp_path / "listen.json"
    state.write_text('{"after": 0}')  # from the beginning (a first start takes only new events)
    try:
        server.start()
        client_env = {**env, "HOOKLINE_URL": server.url, "HOOKLINE_API_KEY": key}
        headers = {"Authorization": f"Bearer {key}"}
        with (
            Threaded(WebhookReceiver()) as receiver,
            httpx.Client(base_url=server.url, headers=headers, timeout=30) as client,
        ):
            secret = client.get("/v1/webhook-secret").json()["secret"]
            first = [client.post("/v1/jobs", json=CHAT).json()["id"] for _ in range(2)]
            for job_id in first:
                client.get(f"/v1/jobs/{job_id}", params={"wait": 20})
            listen = [
                "listen", "--forward-to", receiver.url(), "--events", "job.succeeded",
                "--state-file", str(state),
            ]  # fmt: skip
            ran = hookline(*listen, "--max-events", "2", env=client_env)
            assert ran.returncode == 0, ran.stderr
            assert ran.stdout.count("job.succeeded") == 2 and "200" in ran.stdout
            later = client.post("/v1/jobs", json=CHAT).json()["id"]
            client.get(f"/v1/jobs/{later}", params={"wait": 20})
            again = hookline(*listen, "--max-events", "1", env=client_env)  # resumes
            assert again.returncode == 0, again.stderr
            received = receiver.at("/hook")
    finally:
        server.stop()
    bodies = [Webhook(secret).verify(r.body, r.headers) for r in received]  # signed for real
    forwarded = [body["data"]["id"] for body in bodies]
    # The first two ran at once and may finish in either order; each is forwarded once, and the
    # second run resumes with the later job only.
    assert sorted(forwarded[:2]) == sorted(first) and forwarded[2:] == [later]  # nothing twice
    assert all(body["type"] == "job.succeeded" for body in bodies)
    assert bodies[0]["data"]["status"] == "succeeded"  # the job, as a real webhook carries it
    assert all(r.id.startswith("msg_listen_") for r in received)


def test_jobs_tail_prints_output_live_then_the_status(
    tmp_path: Path, env: dict[str, str], threaded_upstream: ScriptedUpstream
) -> None:
    text = "".join(f"w{i} " for i in range(10))
    threaded_upstream.script("m", Reply(text=text, chunks=10, token_delay=0.05))
    key = hookline("keys", "create", "--tenant", "demo", env=env).stdout.strip()
    server = GatewayProcess("serve", env, tmp_path)
    try:
        server.start()
        client_env = {**env, "HOOKLINE_URL": server.url, "HOOKLINE_API_KEY": key}
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as c:
            job = c.post("/v1/jobs", json=CHAT).json()["id"]
        tail = hookline("jobs", "tail", job, env=client_env)
        missing = hookline("jobs", "tail", "job_nope", env=client_env)
    finally:
        server.stop()
    assert tail.returncode == 0, tail.stderr
    assert tail.stdout.strip() == text.strip()
    assert f"{job} succeeded" in tail.stderr
    assert missing.returncode == 1 and "404" in missing.stderr


def test_dev_mode_sends_webhooks_to_localhost_and_says_so_once(
    tmp_path: Path, threaded_upstream: ScriptedUpstream
) -> None:
    config = write_config(tmp_path / "dev.toml", threaded_upstream.base_url, allowed_networks=())
    env = {
        "HOOKLINE_CONFIG": str(config),
        "HOOKLINE_DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}",
    }
    key = hookline("keys", "create", "--tenant", "demo", env=env).stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}
    with Threaded(WebhookReceiver()) as receiver:
        hook = {"url": receiver.url().replace("127.0.0.1", "localhost")}
        production = GatewayProcess("serve", env, tmp_path)
        try:
            production.start()
            refused = httpx.post(
                f"{production.url}/v1/jobs", json={**CHAT, "webhook": hook}, headers=headers
            )
        finally:
            production.stop()
        assert refused.status_code == 422, refused.text
        assert "hookline serve --dev" in refused.json()["detail"]  # the refusal says what to do
        assert "development mode" not in production.log.read_text()

        dev = GatewayProcess("serve", {**env, "HOOKLINE_DEV": "1"}, tmp_path)  # --dev's twin
        try:
            dev.start()
            with httpx.Client(base_url=dev.url, headers=headers, timeout=30) as client:
                secret = client.get("/v1/webhook-secret").json()["secret"]
                job = client.post("/v1/jobs", json={**CHAT, "webhook": hook}).json()
                deadline = time.monotonic() + 20
                while not receiver.at("/hook"):
                    assert time.monotonic() < deadline, "the webhook never came"
                    time.sleep(0.05)
        finally:
            dev.stop()
    [message] = receiver.at("/hook")
    assert Webhook(secret).verify(message.body, message.headers)["data"]["id"] == job["id"]
    assert dev.log.read_text().count("development mode: webhooks may go to loopback") == 1


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_keys_list_and_a_revocation_every_api_process_obeys_at_once(
    tmp_path: Path, env: dict[str, str], database: str, request: pytest.FixtureRequest
) -> None:
    if database == "postgresql":
        env = {**env, "HOOKLINE_DATABASE_URL": request.getfixturevalue("postgres_url")}
    made = hookline("keys", "create", "--tenant", "demo", "--name", "laptop", "--json", env=env)
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    key = created["key"]
    assert created["name"] == "laptop" and created["expires_at"] is None
    hookline("keys", "create", "--tenant", "ops", "--admin", "--expires-in", "90d", env=env)
    listed = hookline("keys", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    header, *lines = listed.stdout.splitlines()
    assert header.split() == ["id", "tenant", "name", "prefix", "created", "expires", "last",
                              "used"]  # fmt: skip
    assert lines[0].split()[:4] == [created["id"], "demo", "laptop", f"{key[:10]}…"]
    assert "(admin)" in lines[1] and lines[1].split()[-1] == "never"  # never used yet

    processes = [GatewayProcess("api", env, tmp_path) for _ in range(2)]  # two API processes
    try:
        for process in processes:
            process.start()
        clients = [
            httpx.Client(base_url=p.url, headers={"Authorization": f"Bearer {key}"})
            for p in processes
        ]
        assert [c.get("/v1/jobs").status_code for c in clients] == [200, 200]  # cached in each
        revoked = hookline("keys", "revoke", created["id"], env=env)
        assert revoked.returncode == 0, revoked.stderr
        assert revoked.stdout.strip() == f"revoked {created['id']} (demo, laptop)"
        first = statuses = [c.get("/v1/jobs").status_code for c in clients]
        deadline = time.monotonic() + 1  # well within the cache time (2 s): the announcement
        while statuses != [401, 401] and time.monotonic() < deadline:
            time.sleep(0.02)
            statuses = [c.get("/v1/jobs").status_code for c in clients]
        assert statuses == [401, 401]
        if database == "sqlite":  # the mark file is read on every request: no wait at all
            assert first == [401, 401]
        for client in clients:
            client.close()
    finally:
        for process in processes:
            process.stop()
    again = hookline("keys", "revoke", key, env=env)  # the key itself works as well as its id
    assert again.returncode == 0 and "revoked already" in again.stdout
    everything = json.loads(hookline("keys", "list", "--all", "--json", env=env).stdout)["data"]
    assert [k["status"] for k in everything] == ["revoked", "active"]
    assert everything[0]["last_used_at"] is not None
    unknown = hookline("keys", "revoke", "key_nope", env=env)
    assert unknown.returncode == 1 and "keys list" in unknown.stderr


class CuttingProxy:
    """A loopback TCP proxy to ``target`` that cuts the first event stream after ``cut_after``
    bytes of its answer, as a dropped connection would."""

    def __init__(self, target: tuple[str, int], cut_after: int) -> None:
        self.target, self.cut_after = target, cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.streams = 0  # event-stream requests seen
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
                cut = threading.Event()  # this connection's answer is to be cut
                for source, sink, requests in ((client, upstream, True), (upstream, client, False)):
                    threading.Thread(
                        target=self._pump, args=(source, sink, requests, cut), daemon=True
                    ).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, requests: bool, cut: threading.Event
    ) -> None:
        answered = 0  # bytes of the cut stream's answer passed on
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if requests and b"text/event-stream" in data.lower():
                    self.streams += 1
                    if self.cuts == 0:
                        self.cuts += 1
                        cut.set()
                if not requests and cut.is_set():
                    if answered + len(data) > self.cut_after:
                        sink.sendall(data[: self.cut_after - answered])
                        break
                    answered += len(data)
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self.listener.close()


def test_submit_stream_prints_every_token_once_across_a_dropped_connection(
    tmp_path: Path, env: dict[str, str], threaded_upstream: ScriptedUpstream
) -> None:
    text = "".join(f"t{i} " for i in range(12))
    threaded_upstream.script("m", Reply(text=text, chunks=12, token_delay=0.1))
    key = hookline("keys", "create", "--tenant", "demo", env=env).stdout.strip()
    server = GatewayProcess("serve", env, tmp_path)
    try:
        server.start()
        proxy = CuttingProxy(("127.0.0.1", server.port), cut_after=1500)
        client_env = {**env, "HOOKLINE_URL": proxy.url, "HOOKLINE_API_KEY": key}
        streamed = hookline("submit", "--model", "m", "-m", "x", "--stream", env=client_env)
        proxy.close()
    finally:
        server.stop()
    assert streamed.returncode == 0, streamed.stderr
    assert (proxy.cuts, proxy.streams) == (1, 2)  # cut once, then resumed
    assert streamed.stdout.strip() == text.strip()  # nothing lost, nothing twice
    assert "succeeded" in streamed.stderr


def test_keys_create_stores_a_tenants_weight_that_its_config_entry_may_override(
    tmp_path: Path, database_url: str
) -> None:
    """``keys create --weight`` stores the tenant's weight; a [[tenants]] entry that sets one
    wins (and the command says so), an entry that sets only limits keeps the stored one."""
    config = tmp_path / "hookline.toml"
    config.write_text(
        "local_model = false\n"
        '[[tenants]]\nname = "pinned"\nweight = 2\n'
        '[[tenants]]\nname = "capped"\nmax_concurrency = 5\n'
    )
    env = {"HOOKLINE_CONFIG": str(config), "HOOKLINE_DATABASE_URL": database_url}
    made = hookline("keys", "create", "--tenant", "acme", "--weight", "3", env=env)
    assert made.returncode == 0 and made.stdout.startswith("hk_"), made.stderr
    assert made.stderr == ""
    assert (
        hookline("keys", "create", "--tenant", "capped", "--weight", "4", env=env).returncode == 0
    )
    pinned = hookline("keys", "create", "--tenant", "pinned", "--weight", "5", env=env)
    assert pinned.returncode == 0, pinned.stderr
    assert "[[tenants]] entry of pinned sets weight = 2, which wins" in pinned.stderr
    refused = hookline("keys", "create", "--tenant", "acme", "--weight", "0", env=env)
    assert refused.returncode == 2 and "weight" in refused.stderr
    listed = hookline("tenants", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {row["tenant"]: row for row in map(json.loads, listed.stdout.splitlines())}
    assert {name: row["weight"] for name, row in rows.items()} == {
        "acme": 3, "capped": 4, "pinned": 2,
    }  # fmt: skip
    assert rows["capped"]["max_concurrency"] == 5


def test_keys_create_gives_a_key_limits_of_its_own(tmp_path: Path, database_url: str) -> None:
    """``keys create --max-concurrency … --daily-token-budget …`` stores the key's own limits,
    which ``keys list`` shows; a limit below 1 is refused."""
    config = tmp_path / "hookline.toml"
    config.write_text("local_model = false\n")
    env = {"HOOKLINE_CONFIG": str(config), "HOOKLINE_DATABASE_URL": database_url}
    made = hookline(
        "keys", "create", "--tenant", "acme", "--name", "ci", "--max-concurrency", "2",
        "--requests-per-minute", "60", "--tokens-per-minute", "50000",
        "--daily-token-budget", "1000000", "--json", env=env,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["limits"] == {
        "max_concurrency": 2, "requests_per_minute": 60, "tokens_per_minute": 50_000,
        "daily_token_budget": 1_000_000,
    }  # fmt: skip
    plain = hookline("keys", "create", "--tenant", "acme", "--json", env=env)
    assert json.loads(plain.stdout)["limits"] == {}
    listed = hookline("keys", "list", "--tenant", "acme", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "concurrency=2 rpm=60 tpm=50000 daily=1000000" in listed.stdout
    refused = hookline("keys", "create", "--tenant", "acme", "--max-concurrency", "0", env=env)
    assert refused.returncode == 2 and "--max-concurrency" in refused.stderr
