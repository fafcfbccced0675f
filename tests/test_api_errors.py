"""Every kind of bad input gets a clear problem+json answer and changes nothing."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import LiveGateway

CHAT = {
    "operation": "chat.completions",
    "model": "m",
    "input": {"messages": [{"role": "user", "content": "hi"}]},
}


def assert_problem(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"].startswith("urn:hookline:problem:")
    assert body["title"] and body["detail"]
    for word in words:
        assert word in body["detail"], body
    return body


async def assert_no_jobs(live: LiveGateway) -> None:
    assert (await live.client.get("/v1/jobs")).json()["data"] == []


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({**CHAT, "operation": "image.magic"}, 422, ["operation", "chat.completions"]),
        ({**CHAT, "input": "not an object"}, 422, ["input"]),
        ({**CHAT, "input": {"messages": []}}, 422, ["input.messages must not be empty"]),
        ({**CHAT, "input": {"messages": "hi"}}, 422, ["input.messages must be an array", "string"]),
        ({**CHAT, "input": {"messages": 7}}, 422, ["input.messages must be an array", "number"]),
        ({**CHAT, "input": {}}, 422, ["input.messages is required for chat.completions"]),
        ({**CHAT, "input": {"prompt": "x"}}, 422, ["input.messages"]),
        ({**CHAT, "operation": "embeddings"}, 422, ["input.input"]),
        (
            {"operation": "chat.completions", "input": {"messages": [{"role": "user"}]}},
            422,
            ["model is required"],
        ),
        ({**CHAT, "priority": "high"}, 422, ["priority"]),
        ({**CHAT, "priority": 1000}, 422, ["priority"]),
        ({**CHAT, "ttl_seconds": -1}, 422, ["ttl_seconds"]),
        ({**CHAT, "metadata": {"k": 5}}, 422, ["metadata"]),
        ({**CHAT, "surprise": True}, 422, ["surprise"]),
        ({**CHAT, "model": ""}, 422, ["model"]),
        ([1, 2, 3], 422, []),
    ],
)
async def test_invalid_job_bodies(
    live: LiveGateway, body: Any, status: int, words: list[str]
) -> None:
    assert_problem(await live.client.post("/v1/jobs", json=body), status, *words)
    await assert_no_jobs(live)


async def test_validation_errors_speak_of_the_callers_fields(live: LiveGateway) -> None:
    """Locations name the request's fields, not pydantic's validator steps, and messages carry
    no "Value error, " prefix."""
    body = assert_problem(await live.client.post("/v1/jobs", json={**CHAT, "operation": 5}), 422)
    assert {e["location"] for e in body["errors"]} == {"body.operation"}, body
    assert not any("[" in e["location"] for e in body["errors"])
    body = assert_problem(
        await live.client.post("/v1/jobs", json={**CHAT, "input": {"messages": "hi"}}), 422
    )
    assert not any(e["message"].startswith("Value error") for e in body["errors"]), body
    assert not body["detail"].count("Value error"), body
    await assert_no_jobs(live)


async def test_an_empty_json_body_is_400_like_malformed_json(live: LiveGateway) -> None:
    empty = await live.client.post(
        "/v1/jobs", content=b"", headers={"Content-Type": "application/json"}
    )
    body = assert_problem(empty, 400, "the request body is empty")
    assert body["type"] == "urn:hookline:problem:malformed-json"
    await assert_no_jobs(live)


async def test_a_webhook_url_that_is_not_a_url_says_so(live: LiveGateway) -> None:
    refused = await live.client.post("/v1/webhook-endpoints", json={"url": "not a url"})
    assert_problem(refused, 422, "'not a url' is not a URL")
    assert (await live.client.get("/v1/webhook-endpoints")).json()["data"] == []


async def test_malformed_json_is_400(live: LiveGateway) -> None:
    response = await live.client.post(
        "/v1/jobs", content=b'{"operation": ', headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 400, "not valid JSON")
    await assert_no_jobs(live)


async def test_body_that_is_not_json_is_415(live: LiveGateway) -> None:
    response = await live.client.post("/v1/jobs", data={"operation": "chat.completions"})
    assert_problem(response, 415, "application/json")
    await assert_no_jobs(live)


async def test_unknown_model_names_the_configured_upstreams(
    database_url: str, upstream: Any
) -> None:
    from tests.conftest import gateway_settings, serve

    settings = gateway_settings(database_url, upstream.base_url)
    narrowed = settings.upstreams[0].model_copy(update={"models": ["gpt-*"]})
    async with serve(settings.model_copy(update={"upstreams": [narrowed]})) as live:
        response = await live.client.post("/v1/jobs", json={**CHAT, "model": "claude-9"})
        assert_problem(response, 422, "claude-9", "scripted (gpt-*)")
        await assert_no_jobs(live)


async def test_body_over_the_limit_is_413(live: LiveGateway) -> None:
    limit = live.gateway.settings.jobs.max_body_bytes
    big = {**CHAT, "input": {"messages": [{"role": "user", "content": "x" * (limit + 10)}]}}
    assert_problem(await live.client.post("/v1/jobs", json=big), 413, str(limit))

    async def chunked() -> Any:
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536

    response = await live.client.post(
        "/v1/jobs", content=chunked(), headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 413)
    await assert_no_jobs(live)


@pytest.mark.parametrize(
    "path", ["/v1/jobs/job_01M89G5FHS30WH7A2GFPC67VJG", "/v1/jobs/nonsense", "/v1/jobs/x/events"]
)
async def test_unknown_job_is_404(live: LiveGateway, path: str) -> None:
    assert_problem(await live.client.get(path), 404)


async def test_unknown_job_cancel_is_404(live: LiveGateway) -> None:
    assert_problem(await live.client.post("/v1/jobs/job_nope/cancel"), 404)


async def test_unknown_route_and_wrong_method(live: LiveGateway) -> None:
    assert_problem(await live.client.get("/v1/nothing-here"), 404)
    assert_problem(await live.client.delete("/v1/jobs"), 405)


@pytest.mark.parametrize(
    "params",
    [{"status": "done"}, {"limit": 0}, {"limit": 1000}, {"operation": "x"}, {"wait": -1}],
)
async def test_bad_query_parameters(live: LiveGateway, params: dict[str, Any]) -> None:
    path = "/v1/jobs/job_x" if "wait" in params else "/v1/jobs"
    assert_problem(await live.client.get(path, params=params), 422)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer hk_wrong"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer"},
    ],
)
async def test_missing_or_bad_key_is_401(live: LiveGateway, headers: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=live.base_url, headers=headers) as anonymous:
        response = await anonymous.post("/v1/jobs", json=CHAT)
        assert_problem(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
        assert_problem(await anonymous.get("/v1/jobs"), 401)
    await assert_no_jobs(live)


async def test_tenants_never_see_each_others_jobs(live: LiveGateway) -> None:
    mine = (await live.client.post("/v1/jobs", json=CHAT, headers={"Idempotency-Key": "k"})).json()
    async with await live.client_for("globex") as other:
        for method, path in [
            ("GET", f"/v1/jobs/{mine['id']}"),
            ("GET", f"/v1/jobs/{mine['id']}?wait=1"),
            ("GET", f"/v1/jobs/{mine['id']}/events"),
            ("POST", f"/v1/jobs/{mine['id']}/cancel"),
        ]:
            assert_problem(await other.request(method, path), 404)
        assert (await other.get("/v1/jobs")).json()["data"] == []
        # The same idempotency key in another tenant is a different job.
        theirs = (await other.post("/v1/jobs", json=CHAT, headers={"Idempotency-Key": "k"})).json()
        assert theirs["id"] != mine["id"]
    job = (await live.client.get(f"/v1/jobs/{mine['id']}")).json()
    assert job["status"] != "cancelled"
    assert [j["id"] for j in (await live.client.get("/v1/jobs")).json()["data"]] == [mine["id"]]
