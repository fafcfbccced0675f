"""Hostile input: whatever a caller sends gets a 4xx problem, writes nothing, and leaves the
gateway answering everyone else."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy import exc as sa_exc

from hookline.api.limits import parse_json
from hookline.api.problems import RequestProblem, install_problem_handlers
from hookline.errors import NotFound
from hookline.jobs import Operation
from hookline.jsonlimits import MAX_DEPTH
from hookline.queue import SubmitRequest
from hookline.store.database import open_database
from tests.conftest import LiveGateway, wait_for_status
from tests.test_api_errors import CHAT, assert_no_jobs, assert_problem

MESSAGES = [{"role": "user", "content": "hi"}]


def nested(depth: int) -> Any:
    """A JSON value ``depth`` levels deep: lists inside lists."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def nested_text(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def raw_body(path: str, extra: bytes) -> bytes:
    """A valid request for ``path`` with ``extra`` (raw JSON text) as one more input field."""
    if path == "/v1/jobs":
        return (
            b'{"operation":"chat.completions","model":"m","input":{"messages":[{"role":"user","content":"hi"}],"x":%s}}'
            % extra
        )
    if path == "/v1/embeddings":
        return b'{"model":"m","input":"hi","x":%s}' % extra
    return b'{"model":"m","messages":[{"role":"user","content":"hi"}],"x":%s}' % extra


def post_raw(live: LiveGateway, path: str, body: bytes) -> Any:
    return live.client.post(path, content=body, headers={"Content-Type": "application/json"})


async def assert_answering(live: LiveGateway) -> None:
    """/healthz answers, and a normal job is accepted and runs to the end."""
    assert (await live.client.get("/healthz", timeout=5)).status_code == 200
    response = await live.client.post("/v1/jobs", json=CHAT, timeout=5)
    assert response.status_code == 202, response.text
    await wait_for_status(live.client, response.json()["id"], {"succeeded"})


# --- finding 1: one hostile body must not stop the gateway


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/jobs", "/v1/embeddings"])
async def test_a_body_nested_1000_deep_is_refused_and_the_gateway_goes_on(
    live: LiveGateway, path: str
) -> None:
    response = await post_raw(live, path, raw_body(path, nested_text(1000)))
    body = assert_problem(response, 400, str(MAX_DEPTH))
    if path != "/v1/jobs":
        assert body["error"]["message"] == body["detail"]  # the facade's OpenAI error object
    await assert_no_jobs(live)
    await assert_answering(live)


async def test_a_job_that_cannot_be_stored_fails_alone_and_gives_its_connection_back(
    live: LiveGateway,
) -> None:
    """Past the API's limits (the queue called directly), storing fails for this job alone: the
    next accept and /healthz work at once, on either database."""
    submission = SubmitRequest(
        operation=Operation.CHAT_COMPLETIONS,
        input={"messages": MESSAGES, "d": nested(1000)},
        model="m",
        upstream="scripted",
    )
    with pytest.raises(Exception):  # noqa: B017 (what matters is what comes after)
        await asyncio.wait_for(live.gateway.queue.submit("acme", submission), 10)
    await assert_answering(live)


async def test_a_write_whose_error_cannot_be_described_gives_its_connection_back(
    tmp_path: Path,
) -> None:
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    deep = nested(1000)

    def hostile(conn: sa.Connection) -> None:
        # What SQLAlchemy raised for the 1,000-deep input before the engines hid parameters: its
        # text shows them, and the repr of a 1,000-deep list is a RecursionError. Whatever fails
        # while a failed write is handled, the connection must go back.
        raise sa_exc.StatementError("Recursion limit reached", "INSERT …", [deep], TypeError())

    try:
        with pytest.raises(Exception):  # noqa: B017
            await database.write(hostile)
        one = await asyncio.wait_for(
            database.write(lambda conn: conn.execute(sa.text("SELECT 1")).scalar()), 5
        )
        assert one == 1
    finally:
        await database.dispose()


async def test_the_problem_handlers_answer_a_recursion_error_and_an_undescribable_error() -> None:
    app = FastAPI()
    install_problem_handlers(app)

    class Undescribable(NotFound):
        def __str__(self) -> str:
            raise RecursionError("maximum recursion depth exceeded")

    @app.get("/recursion")
    async def recursion() -> None:
        raise RecursionError("maximum recursion depth exceeded")

    @app.get("/undescribable")
    async def undescribable() -> None:
        raise Undescribable()

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert_problem(await client.get("/recursion"), 422, "nested too deep")
        assert_problem(await client.get("/undescribable"), 404)


# --- finding 2: JSON past the limits is a 400 problem and writes nothing


# Raw JSON text put into a valid request's input, and words of the problem it gets.
PAST_THE_LIMITS: list[tuple[bytes, str]] = [
    (nested_text(MAX_DEPTH + 1), "nests deeper"),
    (nested_text(254), "nests deeper"),
    (nested_text(999), "nests deeper"),
    (nested_text(1100), "not valid JSON"),
    (str(2**64).encode(), "64-bit"),
    (str(2**63).encode(), "64-bit"),
    (str(-(2**63) - 1).encode(), "64-bit"),
    (b"1" * 400, "not valid JSON"),
    (b'"\\ud800"', "not valid JSON"),
    (b'{"k": "\\udfff"}', "not valid JSON"),
    (b"NaN", "not valid JSON"),
    (b"-Infinity", "not valid JSON"),
    (b"1e400", "not valid JSON"),
    (b'"a\\u0000b"', "NUL"),  # PostgreSQL's JSONB cannot store it
    (b'{"\\u0000": 1}', "NUL"),
]


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/chat/completions", "/v1/embeddings"])
async def test_json_past_the_limits_is_a_400_problem_and_writes_nothing(
    live: LiveGateway, path: str
) -> None:
    for extra, words in PAST_THE_LIMITS:
        response = await post_raw(live, path, raw_body(path, extra))
        assert response.status_code == 400, (extra[:20], response.text)
        assert_problem(response, 400, words)
    await assert_no_jobs(live)


async def test_limits_in_the_fields_that_are_not_input(live: LiveGateway) -> None:
    cases = [
        b'{"operation":"chat.completions","model":"m","input":{"messages":[]},"max_tokens":%d}'
        % 2**64,
        b'{"operation":"chat.completions","model":"m","input":{"messages":[{"role":"user","content":"hi"}]},"metadata":{"k":"\\ud800"}}',
        b'{"operation":"chat.completions","model":"m","input":{"messages":[{"role":"user","content":"hi"}]},"ttl_seconds":NaN}',
        b'{"operation":"chat.completions","model":"m","input":{"messages":[{"role":"user","content":"hi"}]},"ttl_seconds":1e400}',
        b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}',
        b'{"operation":"chat.completions","model":"m","input":{"messages":[{"role":"user","content":"hi"}]},"metadata":{"k":"\\u0000"}}',
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":%d}' % 2**64,
    ]
    for body in cases:
        path = "/v1/jobs" if b"operation" in body else "/v1/chat/completions"
        assert_problem(await post_raw(live, path, body), 400)
    await assert_no_jobs(live)
    await assert_answering(live)


def test_parse_json_takes_everything_within_the_limits() -> None:
    assert parse_json(orjson.dumps(nested(MAX_DEPTH))) == nested(MAX_DEPTH)
    edges = {"max": 2**63 - 1, "min": -(2**63), "big float": 1e19, "small": -1.5e300}
    assert parse_json(orjson.dumps(edges)) == edges
    assert parse_json(b"[1e19, 18446744073709551615.0, 2e63]") == [1e19, 2**64 * 1.0, 2e63]
    assert parse_json('"\\ud83d\\ude00 ünïcode"'.encode()) == "\U0001f600 ünïcode"
    assert parse_json(b'"\\\\u0000"') == "\\u0000"  # the text, not the character
    for text in [b"[%d]" % 2**64, b'{"a": [%d]}' % -(2**64), b"%d" % 2**63]:
        with pytest.raises(RequestProblem, match="64-bit") as raised:
            parse_json(text)
        assert raised.value.status == 400
    with pytest.raises(RequestProblem, match="deeper than 3"):
        parse_json(orjson.dumps(nested(4)), max_depth=3)
    json.loads(orjson.dumps(nested(MAX_DEPTH)))  # what FastAPI's own parser reads again


# --- finding 2: other 500s that are 4xx problems


async def test_bodies_that_used_to_be_500s_are_422_problems(live: LiveGateway) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({**CHAT, "operation": "batch"}, "operation"),
        ({**CHAT, "priority": "5"}, "priority"),
        ({**CHAT, "priority": True}, "priority"),
        ({**CHAT, "priority": 5.0}, "priority"),
        ({**CHAT, "ttl_seconds": "5"}, "ttl_seconds"),
        ({**CHAT, "ttl_seconds": True}, "ttl_seconds"),
        ({**CHAT, "webhook": {"url": "http://[::1"}}, "not a URL"),
        ({**CHAT, "webhook": {"url": f"http://{'a' * 300}.example.com/"}}, "host"),
        ({**CHAT, "webhook": {"url": f"http://{'a.' * 130}example.com/"}}, "longer than"),
        ({**CHAT, "webhook": {"url": "http://a..b.example.com/"}}, "host"),
    ]
    for body, words in cases:
        response = await live.client.post("/v1/jobs", json=body)
        assert response.status_code == 422, (body, response.text)
        assert_problem(response, 422, words)
    await assert_no_jobs(live)
    await assert_answering(live)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_spec_offers_only_operations_a_caller_may_submit(live: LiveGateway) -> None:
    spec = (await live.client.get("/openapi.json")).json()
    offered = spec["components"]["schemas"]["JobOperation"]["enum"]
    assert sorted(offered) == sorted(o.value for o in Operation if o is not Operation.BATCH)
    assert_problem(await live.client.get("/v1/jobs", params={"operation": "batch"}), 422)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_webhook_endpoints_refuse_bad_urls_and_loose_numbers(live: LiveGateway) -> None:
    for body in [
        {"url": "http://[::1"},
        {"url": f"http://{'a' * 300}.example.com/"},
        {"url": "https://example.com/hook", "rate_limit_per_second": "5"},
        {"url": "https://example.com/hook", "rate_limit_per_second": True},
    ]:
        assert_problem(await live.client.post("/v1/webhook-endpoints", json=body), 422)
    rotation = await live.client.post("/v1/webhook-secret/rotate", json={"overlap_seconds": "5"})
    assert_problem(rotation, 422, "overlap_seconds")
    assert (await live.client.get("/v1/webhook-endpoints")).json()["data"] == []


# --- finding 8: one answer for malformed JSON, cursors, the key first


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/chat/completions", "/v1/webhook-endpoints"])
async def test_malformed_json_is_400_on_every_route(live: LiveGateway, path: str) -> None:
    assert_problem(await post_raw(live, path, b'{"model": '), 400, "not valid JSON")
    response = await live.client.post(path, content=b"{}", headers={"Content-Type": "text/plain"})
    assert_problem(response, 415, "application/json")
    await assert_no_jobs(live)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_cursor_the_api_did_not_give_is_a_400(live: LiveGateway) -> None:
    for path in ["/v1/jobs", "/v1/deliveries"]:
        for cursor in ["garbage", "job_", "job_01M89G5FHS30WH7A2GFPC67VJ!", "msg_x", "x" * 64]:
            response = await live.client.get(path, params={"cursor": cursor})
            assert_problem(response, 400, "cursor")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_cursor_the_api_gave_pages_on(live: LiveGateway) -> None:
    for _ in range(3):
        assert (await live.client.post("/v1/jobs", json=CHAT)).status_code == 202
    first = (await live.client.get("/v1/jobs", params={"limit": 2})).json()
    rest = (await live.client.get("/v1/jobs", params={"cursor": first["next_cursor"]})).json()
    assert len(first["data"]) == 2 and len(rest["data"]) == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_key_is_checked_before_anything_else(live: LiveGateway) -> None:
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/jobs", {"json": {"operation": "nope"}}),
        ("POST", "/v1/jobs", {"content": b"{not json"}),
        ("POST", "/v1/jobs", {"content": raw_body("/v1/jobs", nested_text(1000))}),
        ("POST", "/v1/chat/completions", {"json": {"messages": "nope"}}),
        ("POST", "/v1/chat/completions", {"content": b"{not json"}),
        ("POST", "/v1/webhook-endpoints", {"json": {"url": "http://[::1"}}),
        ("POST", "/v1/batches", {"json": {}}),
        ("GET", "/v1/jobs", {"params": {"cursor": "garbage", "limit": 0}}),
        ("GET", "/v1/nothing-here", {}),
    ]
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=live.base_url, headers=headers) as anonymous:
        for method, path, kwargs in requests:
            response = await anonymous.request(method, path, **kwargs)
            assert response.status_code == 401, (method, path, kwargs, response.text)
            assert_problem(response, 401)
            assert response.headers["www-authenticate"] == "Bearer"
    await assert_no_jobs(live)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_key_is_checked_before_a_large_body_is_read(live: LiveGateway) -> None:
    limit = live.gateway.settings.jobs.max_body_bytes
    async with httpx.AsyncClient(base_url=live.base_url) as anonymous:
        response = await anonymous.post("/v1/jobs", content=b"x" * (limit + 1))
    assert_problem(response, 401)
