"""``hookline sinks list / test / retry`` and ``POST /v1/sinks/{name}/recover``, through a real
``hookline serve`` and the CLI as an operator runs them: one config file, one database. The sinks
are JSONL files (no broker needed); a sink whose directory is a plain file fails until that file
is removed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from tests.processes import GatewayProcess, hookline, write_config
from tests.scripted_upstream import ScriptedUpstream, Threaded

CHAT = {
    "operation": "chat.completions",
    "model": "m",
    "input": {"messages": [{"role": "user", "content": "x"}]},
}


def sinks_config(path: Path, upstream_url: str, sinks: list[dict[str, Any]]) -> Path:
    """``write_config``'s file with these ``[[sinks]]`` and failed sends dead after one retry."""
    write_config(path, upstream_url)
    text = path.read_text().replace("[webhooks]\n", "[webhooks]\nretry_schedule_seconds = [0.1]\n")
    for sink in sinks:
        text += "\n[[sinks]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in sink.items())
    path.write_text(text)
    return path


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _until(what: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := what()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return found


def test_sinks_list_test_and_retry_through_a_running_gateway(tmp_path: Path) -> None:
    files, blocked = tmp_path / "files", tmp_path / "blocked"
    blocked.write_text("a file where the sink's directory should be")  # the sink fails
    with Threaded(ScriptedUpstream()) as upstream:
        config = sinks_config(
            tmp_path / "hookline.toml",
            upstream.base_url,
            [
                {"name": "files", "type": "jsonl", "url": files.as_uri(), "target": "f.jsonl"},
                {
                    "name": "broken",
                    "type": "jsonl",
                    "url": blocked.as_uri(),
                    "target": "b.jsonl",
                    "events": ["job.succeeded"],
                },
            ],
        )
        env = {
            "HOOKLINE_CONFIG": str(config),
            "HOOKLINE_DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}",
        }

        listed = hookline("sinks", "list", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        assert [(r["name"], r["type"], r["target"]) for r in rows] == [
            ("files", "jsonl", "f.jsonl"), ("broken", "jsonl", "b.jsonl"),
        ]  # fmt: skip
        assert "url" not in rows[0] and str(files) not in listed.stdout  # no URLs (credentials)
        plain = hookline("sinks", "list", env=env)
        assert plain.returncode == 0 and "files  jsonl -> f.jsonl" in plain.stdout, plain

        unknown = hookline("sinks", "test", "nope", env=env)
        assert unknown.returncode == 2 and "nope" in unknown.stderr, unknown

        server = GatewayProcess("serve", env, tmp_path)
        try:
            server.start()
            sent = hookline("sinks", "test", "files", "--json", env=env)
            assert sent.returncode == 0, (sent.stderr, server.log.read_text())
            answer = json.loads(sent.stdout)
            assert answer["delivery"]["status"] == "succeeded"
            assert [(x["id"], x["type"]) for x in _lines(files / "f.jsonl")] == [
                (answer["id"], "sink.test")
            ]
            failing = hookline("sinks", "test", "broken", "--wait", "3", env=env)
            assert failing.returncode == 1, failing
            assert "not sent to broken" in failing.stderr and "Error" in failing.stderr, failing

            # Two jobs whose messages to "broken" fail for good: dead letters.
            keys = {t: hookline("keys", "create", "--tenant", t, env=env).stdout.strip()
                    for t in ("demo", "ops")}  # fmt: skip
            with httpx.Client(base_url=server.url, timeout=30) as client:
                demo = {"Authorization": f"Bearer {keys['demo']}"}
                ops = {"Authorization": f"Bearer {keys['ops']}"}
                job_ids = [client.post("/v1/jobs", json=CHAT, headers=demo).json()["id"]
                           for _ in range(2)]  # fmt: skip

                def dead(headers: dict[str, str]) -> list[dict[str, Any]]:
                    listed = client.get(
                        "/v1/deliveries", params={"status": "failed"}, headers=headers
                    ).json()["data"]
                    return [d for d in listed if d["sink"] == "broken"]

                _until(lambda: len(dead(demo)) == 2)
                _until(lambda: len(dead(ops)) == 1)
                blocked.unlink()  # the sink can write now

                retried = hookline(
                    "sinks", "retry", "broken", "--tenant", "demo", "--json", env=env
                )
                assert retried.returncode == 0, retried.stderr
                assert json.loads(retried.stdout) == {"sink": "broken", "queued": 2}
                written = _until(
                    lambda: len(_lines(blocked / "b.jsonl")) == 2 and _lines(blocked / "b.jsonl")
                )
                assert sorted(x["data"]["id"] for x in written) == sorted(job_ids)
                assert dead(demo) == [] and len(dead(ops)) == 1  # ops's own stays dead

                # The API's replay, per tenant: ops's dead sink.test goes out too.
                unknown_sink = client.post("/v1/sinks/nope/recover", headers=ops)
                assert unknown_sink.status_code == 404, unknown_sink.text
                recovered = client.post("/v1/sinks/broken/recover", headers=ops)
                assert recovered.status_code == 202, recovered.text
                assert recovered.json() == {"object": "recovery", "queued": 1}
                _until(lambda: len(_lines(blocked / "b.jsonl")) == 3)
                assert _lines(blocked / "b.jsonl")[-1]["type"] == "sink.test"
                again = hookline("sinks", "test", "broken", env=env)
                assert again.returncode == 0 and "sent msg_" in again.stdout, again
        finally:
            server.stop()
