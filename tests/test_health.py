"""``/readyz``: each dependency's check in one body; only a required one failing makes it 503.
An upstream whose circuit opened shows as failing without taking the process out of its load
balancer (jobs are still accepted, and wait)."""

from __future__ import annotations

from typing import Any

from hookline.observability.health import Check
from hookline.store.migrate import head_revision
from tests.conftest import gateway_settings, serve, wait_for_status
from tests.scripted_upstream import ScriptedUpstream, Status


def chat(model: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": "hi"}]
    return {"operation": "chat.completions", "model": model, "input": {"messages": messages}}


async def test_readiness_reports_every_dependency(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    upstream.script("down", Status(503))
    settings = gateway_settings(database_url, upstream.base_url, jobs={"max_attempts": 3},
                                upstream={"circuit_failures": 3})  # fmt: skip
    async with serve(settings) as live:
        before = (await live.client.get("/readyz")).json()
        assert before["checks"]["upstream:scripted"]["circuit"] == "closed"
        ok = (await live.client.post("/v1/jobs", json=chat("m"))).json()
        await wait_for_status(live.client, ok["id"], {"succeeded"})
        good = (await live.client.get("/readyz")).json()["checks"]
        assert good["upstream:scripted"]["status"] == "ok"
        failed = (await live.client.post("/v1/jobs", json=chat("down"))).json()
        await wait_for_status(live.client, failed["id"], {"failed"})  # three calls, each a 503
        ready = await live.client.get("/readyz")
    assert ready.status_code == 200  # an upstream down does not stop the accepting
    body = ready.json()
    assert body["status"] == "ready" and body["revision"] == head_revision()
    checks = body["checks"]
    assert checks["database"] == {"status": "ok", "required": True}
    assert checks["schema"]["status"] == "ok" and checks["schema"]["state"] == "current"
    upstream_check = checks["upstream:scripted"]
    assert upstream_check["status"] == "failing" and upstream_check["required"] is False
    assert upstream_check["consecutive_failures"] == 3 and upstream_check["last_error"] == "503"
    assert upstream_check["circuit"] == "open" and "circuit is open" in upstream_check["detail"]
    if database_url.startswith("postgresql"):  # the LISTEN connection between processes
        assert checks["notify"] == {"status": "ok", "required": False}
    else:
        assert "notify" not in checks


async def test_a_required_check_failing_makes_it_503_and_says_which(
    database_url: str, upstream: ScriptedUpstream
) -> None:
    async with serve(gateway_settings(database_url, upstream.base_url)) as live:

        async def broker_down() -> Check:
            return Check("failing", required=False, detail="connection refused")

        async def vault_down() -> Check:
            raise ConnectionError("vault unreachable")

        live.gateway.checks["sink:broker"] = broker_down
        degraded = await live.client.get("/readyz")
        live.gateway.checks["vault"] = vault_down
        down = await live.client.get("/readyz")
    assert degraded.status_code == 200
    assert degraded.json()["checks"]["sink:broker"]["detail"] == "connection refused"
    assert down.status_code == 503
    assert down.headers["content-type"] == "application/problem+json"
    problem = down.json()
    assert problem["detail"] == "vault: ConnectionError: vault unreachable"
    assert problem["checks"]["vault"]["status"] == "failing"
    assert problem["checks"]["database"]["status"] == "ok"
