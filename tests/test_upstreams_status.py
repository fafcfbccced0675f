"""What an operator sees of the upstreams: ``GET /v1/admin/upstreams`` and ``hookline upstreams``
(health, circuit, concurrency in use, queue depth), through the HTTP API and the CLI's runner."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from typer.testing import CliRunner

from hookline.cli import app
from hookline.config import Settings
from tests.conftest import LiveGateway, gateway_settings, serve, wait_for_status
from tests.scripted_upstream import Reply, ScriptedUpstream, Status


def two_upstreams(database_url: str, upstream: ScriptedUpstream) -> Settings:
    """Upstream "flaky" serves f-* (its circuit opens at its first failure), "scripted" the rest,
    one job at a time; a job is tried once."""
    base = gateway_settings(
        database_url, upstream.base_url, upstream={"max_concurrency": 1}, jobs={"max_attempts": 1}
    )
    (scripted,) = base.upstreams
    flaky = scripted.model_copy(
        update={"name": "flaky", "models": ["f-*"], "circuit_failures": 1,
                "circuit_cooldown_seconds": 60.0}
    )  # fmt: skip
    return base.model_copy(update={"upstreams": [flaky, scripted]})


def chat(model: str) -> dict[str, Any]:
    return {"operation": "chat.completions", "model": model,
            "input": {"messages": [{"role": "user", "content": "hi"}]}}  # fmt: skip


def hookline_cli(live: LiveGateway, key: str, *args: str) -> Any:
    """``hookline upstreams ARGS`` in the CLI's runner (in a thread: the gateway runs in this
    loop)."""
    env = {"HOOKLINE_URL": live.base_url, "HOOKLINE_API_KEY": key, "NO_COLOR": "1"}
    return asyncio.to_thread(CliRunner().invoke, app, ["upstreams", *args], env=env)


async def test_upstreams_show_health_circuit_concurrency_and_queue_depth(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    upstream.script("slow", Reply(first_token_delay=3.0))
    upstream.script("f-model", Status(500, message="flaky is down"))
    async with serve(two_upstreams(database_url, upstream)) as live:
        admin_key = await live.gateway.keys.create("ops", admin=True)
        admin = httpx.AsyncClient(
            base_url=live.base_url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30
        )
        async with admin:
            failed = (await live.client.post("/v1/jobs", json=chat("f-model"))).json()
            await wait_for_status(live.client, failed["id"], {"failed"})
            ids = [(await live.client.post("/v1/jobs", json=chat("slow"))).json()["id"]
                   for _ in range(3)]  # fmt: skip
            await wait_for_status(live.client, ids[0], {"running"})

            refused = await live.client.get("/v1/admin/upstreams")  # a tenant's key
            assert refused.status_code == 403, refused.text
            assert "admin key" in refused.json()["detail"]
            listed = await admin.get("/v1/admin/upstreams")
            assert listed.status_code == 200, listed.text
            found = {u["name"]: u for u in listed.json()["data"]}
            assert list(found) == ["flaky", "scripted"]  # the configuration's order
            flaky, scripted = found["flaky"], found["scripted"]
            assert flaky["circuit"]["state"] == "open" and flaky["health"] == "failing"
            assert 50 < flaky["circuit"]["retry_in_seconds"] <= 60
            assert flaky["last_error"] == "500" and flaky["failed_last_hour"] == 1
            assert (flaky["running"], flaky["queued"]) == (0, 0)
            assert scripted["circuit"] == {"state": "closed", "consecutive_failures": 0,
                                           "failures_to_open": 5, "retry_in_seconds": 0.0}  # fmt: skip
            assert scripted["health"] == "ok" and scripted["type"] == "openai"
            assert (scripted["running"], scripted["max_concurrency"]) == (1, 1)
            assert scripted["queued"] == 2 and scripted["oldest_queued_at"].endswith("Z")

            # The CLI says the same, as a table and as JSON.
            shown = await hookline_cli(live, admin_key)
            assert shown.exit_code == 0, shown.output
            header, *rows = shown.output.splitlines()
            assert header.split()[:6] == ["NAME", "TYPE", "HEALTH", "CIRCUIT", "RUNNING", "QUEUED"]
            assert rows[0].split()[:4] == ["flaky", "openai", "failing", "(500)"]
            assert "open (" in rows[0] and " s left)" in rows[0]
            assert rows[1].split()[:6] == ["scripted", "openai", "ok", "closed", "1/1", "2"]
            as_json = await hookline_cli(live, admin_key, "--json")
            assert as_json.exit_code == 0, as_json.output
            data = json.loads(as_json.output)["data"]
            assert [(u["name"], u["queued"]) for u in data] == [("flaky", 0), ("scripted", 2)]
            # A tenant's key: the API's refusal, as one line, exit 1.
            not_admin = await hookline_cli(live, live.api_key)
            assert not_admin.exit_code == 1
            assert "error 403" in not_admin.output and "admin key" in not_admin.output

            for job_id in ids:
                await live.client.post(f"/v1/jobs/{job_id}/cancel")
