"""hookline.client.Client and AsyncClient against a live hookline on SQLite.

Faults the client must survive (a response lost after the server acted, a stream cut mid-way)
are made by a transport that forwards to the real server and then drops what came back."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hookline.client import (
    AsyncClient,
    AuthError,
    Client,
    Event,
    JobFailed,
    NotFound,
    RateLimited,
    TextDelta,
    Timeout,
    _core,
)
from hookline.client.errors import raise_for_status
from tests.conftest import LiveGateway, gateway_settings, serve
from tests.scripted_upstream import Hang, Reply, ScriptedUpstream, Status

CHAT = {"messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    path = tmp_path / "client.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
async def live(sqlite_url: str, upstream: ScriptedUpstream) -> AsyncIterator[LiveGateway]:
    async with serve(gateway_settings(sqlite_url, upstream.base_url)) as gateway:
        yield gateway


@pytest.fixture
async def client(live: LiveGateway) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(live.base_url, live.api_key) as hookline:
        yield hookline


class _Dropping(httpx.AsyncBaseTransport):
    """Forwards to the real server; drops the first response of requests ``drop`` picks (after
    the server handled them), or cuts the first event stream after ``cut_after`` lines."""

    def __init__(self, drop: Any = None, cut_after: int | None = None) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.drop = drop
        self.cut_after = cut_after
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = await self.inner.handle_async_request(request)
        if self.drop is not None and self.drop(request):
            self.drop = None
            await response.aread()
            raise httpx.ReadError("connection reset (injected)", request=request)
        if self.cut_after is not None and request.headers.get("accept") == "text/event-stream":
            limit, self.cut_after = self.cut_after, None
            return httpx.Response(
                response.status_code, headers=response.headers,
                stream=_Cut(response, limit), request=request,
            )  # fmt: skip
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Cut(httpx.AsyncByteStream):
    def __init__(self, response: httpx.Response, lines: int) -> None:
        self.response = response
        self.lines = lines

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        buffer = b""
        async for chunk in self.response.aiter_raw():
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                yield event + b"\n\n"
                seen += 1
                if seen >= self.lines:
                    await self.response.aclose()
                    raise httpx.ReadError("stream cut (injected)")
        if buffer:
            yield buffer

    async def aclose(self) -> None:
        await self.response.aclose()


async def test_submit_get_wait_list_cancel(client: AsyncClient, upstream: ScriptedUpstream) -> None:
    job = await client.submit("chat.completions", CHAT, model="m", metadata={"k": "v"})
    assert job.status in ("queued", "running", "succeeded") and job.metadata == {"k": "v"}
    done = await client.wait(job, timeout=20)
    assert done.status == "succeeded" and done.text == "echo: hello there"
    assert (await client.get(job.id)).id == job.id
    for _ in range(3):
        await client.submit("chat.completions", CHAT, model="m")
    listed = [j.id async for j in client.list(page_size=2)]  # three pages of two
    assert len(listed) == 4 and listed[-1] == job.id
    upstream.script("m", Hang(60))
    slow = await client.submit("chat.completions", CHAT, model="m")
    with pytest.raises(Timeout):
        await client.wait(slow, timeout=1)
    cancelled = await client.cancel(slow)
    assert cancelled.status == "cancelled"
    with pytest.raises(JobFailed) as failed:
        await client.wait(slow)
    assert failed.value.job.status == "cancelled"


async def test_exceptions(
    live: LiveGateway, client: AsyncClient, upstream: ScriptedUpstream
) -> None:
    upstream.script("bad", Status(400, message="the model refuses"))
    job = await client.submit("chat.completions", CHAT, model="bad")
    with pytest.raises(JobFailed) as failed:
        await client.wait(job, timeout=20)
    assert "the model refuses" in str(failed.value.error)
    with pytest.raises(NotFound):
        await client.get("job_nope")
    async with AsyncClient(live.base_url, "hk_wrong") as stranger:
        with pytest.raises(AuthError):
            await stranger.get(job.id)
    request = httpx.Request("GET", "http://127.0.0.1/")
    with pytest.raises(RateLimited) as limited:
        raise_for_status(
            httpx.Response(429, headers={"Retry-After": "7"}, json={}, request=request)
        )
    assert limited.value.retry_after == 7


async def test_a_submit_retried_after_a_lost_response_makes_one_job(live: LiveGateway) -> None:
    transport = _Dropping(drop=lambda r: r.method == "POST" and r.url.path == "/v1/jobs")
    async with AsyncClient(
        live.base_url, live.api_key, http_client=httpx.AsyncClient(transport=transport)
    ) as client:
        job = await client.submit("chat.completions", CHAT, model="m")
        jobs = [j async for j in client.list()]
    posts = [r for r in transport.requests if r.method == "POST"]
    assert len(posts) == 2  # the first one's answer was lost
    assert posts[0].headers["idempotency-key"] == posts[1].headers["idempotency-key"]
    assert [j.id for j in jobs] == [job.id]  # one job


async def test_stream_resumes_after_a_dropped_connection(
    live: LiveGateway, upstream: ScriptedUpstream
) -> None:
    text = "".join(f"part{i} " for i in range(12))
    upstream.script("m", Reply(text=text, chunks=12, token_delay=0.05))
    transport = _Dropping(cut_after=4)
    async with AsyncClient(
        live.base_url, live.api_key, http_client=httpx.AsyncClient(transport=transport)
    ) as client:
        job = await client.submit("chat.completions", CHAT, model="m")
        items = [item async for item in client.stream(job)]
    streams = [r for r in transport.requests if r.headers.get("accept") == "text/event-stream"]
    assert len(streams) == 2 and "last-event-id" in streams[1].headers  # cut, then resumed
    assert "".join(i.text for i in items if isinstance(i, TextDelta)) == text
    events = [i.type for i in items if isinstance(i, Event)]
    assert events[-1] == "job.succeeded" and events.count("job.succeeded") == 1


async def test_batch_helpers(client: AsyncClient) -> None:
    lines = [
        {"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", **CHAT}}
        for i in range(3)
    ]  # fmt: skip
    batch = await client.submit_batch(lines)
    done = await client.wait_batch(batch, timeout=30, poll=0.1)
    assert (done.status, done.total, done.completed) == ("completed", 3, 3)
    results = [r async for r in client.batch_results(done)]
    assert [r.custom_id for r in results] == ["b0", "b1", "b2"]
    assert all(r.ok and r.body is not None for r in results)


async def test_the_blocking_client(live: LiveGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOKLINE_URL", live.base_url)
    monkeypatch.setenv("HOOKLINE_API_KEY", live.api_key)

    def use() -> tuple[str | None, str, int, int]:
        with Client() as client:  # configured from the environment
            job = client.submit("chat.completions", CHAT, model="m")
            done = client.wait(job, timeout=20)
            text = "".join(i.text for i in client.stream(job) if isinstance(i, TextDelta))
            batch = client.wait_batch(
                client.submit_batch([{"custom_id": "x", "method": "POST",
                                      "url": "/v1/chat/completions",
                                      "body": {"model": "m", **CHAT}}]),
                timeout=30, poll=0.1,
            )  # fmt: skip
            return done.text, text, len(list(client.list())), len(list(client.batch_results(batch)))

    done_text, streamed, listed, results = await asyncio.to_thread(use)
    assert done_text == streamed == "echo: hello there"
    assert listed == 2 and results == 1  # the job and the batch's item


def _imported_by(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after ``statement``."""
    code = f"{statement}; import json, sys; print(json.dumps(sorted(sys.modules)))"
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(ran.stdout))


SERVER_LIBRARIES = {
    "fastapi",
    "starlette",
    "sqlalchemy",
    "pydantic",
    "aiohttp",
    "orjson",
    "uvicorn",
}


def test_the_client_imports_nothing_of_the_server() -> None:
    loaded = _imported_by("import hookline.client, hookline.client.listen")
    ours = {name for name in loaded if name == "hookline" or name.startswith("hookline.")}
    assert ours - {"hookline", "hookline._version"} == {
        name for name in ours if name.startswith("hookline.client")
    }
    assert not loaded & SERVER_LIBRARIES
    # The server loads neither the client nor httpx.
    server = _imported_by("import hookline.gateway, hookline.api")
    assert "httpx" not in server and not any(n.startswith("hookline.client") for n in server)
    # `from hookline import Client`, as before the client had its package, loads it then only.
    assert "httpx" not in _imported_by("import hookline")
    assert "hookline.client" in _imported_by("from hookline import Client")
    # `hookline.Job` would be a second meaning of the server's hookline.jobs.Job: there is none.
    import hookline

    with pytest.raises(AttributeError):
        hookline.Job  # noqa: B018


def test_listen_forwards_job_events_with_the_job_as_the_server_does() -> None:
    from hookline import deliveries
    from hookline.client import listen

    assert listen.JOB_STATE_EVENT_TYPES == deliveries.JOB_STATE_EVENT_TYPES


async def test_both_clients_run_the_same_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries of a 503 and of a lost answer; a long-poll's request waits longer than its wait."""
    monkeypatch.setattr(_core, "backoff", lambda attempt: 0.0)
    job = {"id": "job_1", "status": "succeeded", "operation": "completions", "model": "m"}
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) % 3 == 1:
            return httpx.Response(503, json={"detail": "busy"})
        if len(seen) % 3 == 2:
            raise httpx.ConnectError("refused (injected)", request=request)
        return httpx.Response(200, json=job)

    transport = httpx.MockTransport(answer)
    with Client("http://gw", "hk_x", http_client=httpx.Client(transport=transport)) as client:
        assert client.wait("job_1", timeout=5).status == "succeeded"
    async with AsyncClient(
        "http://gw", "hk_x", http_client=httpx.AsyncClient(transport=transport)
    ) as aclient:
        assert (await aclient.wait("job_1", timeout=5)).status == "succeeded"
    assert len(seen) == 6
    assert all(r.extensions["timeout"]["read"] == 30.0 + int(r.url.params["wait"]) for r in seen)
