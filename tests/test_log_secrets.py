"""No secret in any log: the WebSocket login's ``?access_token=`` in what a running gateway prints,
and the values a failing SQL statement was given (a job's input, its webhook URL, its idempotency
key) in a database error, which is what the gateway logs and answers."""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import websockets

from hookline.cli.logs import RedactSecrets
from hookline.errors import StoreError
from hookline.store.database import open_database
from hookline.store.schema import jobs
from tests.processes import GatewayProcess, hookline, write_config
from tests.scripted_upstream import ScriptedUpstream, Threaded
from tests.test_store import make_job


@pytest.fixture
def threaded_upstream() -> Iterator[ScriptedUpstream]:
    with Threaded(ScriptedUpstream()) as upstream:
        yield upstream


async def _watch(url: str) -> int:
    """Follow a job's WebSocket until it closes; its close code."""
    async with websockets.connect(url) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await ws.recv()
    return closed.value.rcvd.code if closed.value.rcvd else 1006


def test_a_websocket_token_never_reaches_the_log(
    tmp_path: Path, threaded_upstream: ScriptedUpstream
) -> None:
    config = write_config(tmp_path / "hookline.toml", threaded_upstream.base_url)
    env = {"HOOKLINE_CONFIG": str(config), "HOOKLINE_DATABASE_URL": f"sqlite:///{tmp_path}/h.db"}
    key = hookline("keys", "create", "--tenant", "demo", env=env).stdout.strip()
    wrong = "hk_" + "x" * 52
    server = GatewayProcess("serve", env, tmp_path)  # at the default log level, info
    try:
        server.start()
        job = httpx.post(
            f"{server.url}/v1/jobs",
            headers={"Authorization": f"Bearer {key}"},
            json={"operation": "chat.completions", "model": "m",
                  "input": {"messages": [{"role": "user", "content": "x"}]}},
        ).json()  # fmt: skip
        base = f"ws://127.0.0.1:{server.port}/v1/jobs/{job['id']}/ws"
        assert asyncio.run(_watch(f"{base}?access_token={key}&after=0")) == 1000
        assert asyncio.run(_watch(f"{base}?access_token={wrong}")) == 4401
        server.terminate()
    finally:
        server.stop()
    log = server.log.read_text()
    assert '"WebSocket /v1/jobs/' in log  # uvicorn told of both connections...
    assert key not in log and key[3:] not in log and wrong not in log  # ...without the keys
    assert log.count("access_token=[redacted]") >= 2
    assert "&after=0" in log  # the rest of the query is kept


def test_the_redaction_keeps_uvicorn_access_lines_whole() -> None:
    # uvicorn's access formatter takes the record's arguments apart: they must stay five.
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/v1/events?api_key=hk_abcdefghijkl&x=1", "1.1", 200), None,
    )  # fmt: skip
    assert RedactSecrets().filter(record)
    assert record.args == ("127.0.0.1:5000", "GET", "/v1/events?api_key=[redacted]&x=1", "1.1", 200)
    other = logging.LogRecord(
        "hookline", logging.WARNING, __file__, 1, "sending to %s failed: %s",
        ("https://example.com/hook?token=abc123&v=2", ValueError("key hk_abcdefghijkl refused")),
        None,
    )  # fmt: skip
    assert RedactSecrets().filter(other)
    message = other.getMessage()
    assert "abc123" not in message and "hk_abcdefghijkl" not in message
    assert message.startswith("sending to https://example.com/hook?token=[redacted]&v=2 failed")


async def test_a_database_error_never_shows_the_values_it_was_given(database_url: str) -> None:
    secrets = ("the whole private prompt", "https://hooks.example.com/T0/B0/s3cr3t", "idem-s3cr3t")
    job = make_job(
        input={"messages": [{"role": "user", "content": secrets[0]}]},
        webhook={"url": secrets[1], "events": None},
        key=secrets[2],
    )
    database = open_database(database_url)
    try:
        await database.write(lambda conn: conn.execute(sa.insert(jobs), [job.as_row()]))
        with pytest.raises(StoreError) as raised:  # the same id again
            await database.write(lambda conn: conn.execute(sa.insert(jobs), [job.as_row()]))
    finally:
        await database.dispose()
    told = "".join(traceback.format_exception(raised.value))  # what a log.exception prints
    assert "INSERT INTO jobs" in told  # the statement is told...
    assert not [secret for secret in secrets if secret in told]  # ...not the values it was given
