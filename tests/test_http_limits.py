"""Hostile clients at the HTTP layer, through a real server on loopback: request heads too large,
heads and bodies sent a byte at a time (hookline.api.server)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
import websockets

from hookline.api import create_app
from hookline.api.server import server_options
from hookline.config import HttpConfig
from hookline.gateway import Gateway
from tests.conftest import gateway_settings

LIMITS = HttpConfig(
    max_header_bytes=8 * 1024,
    header_timeout_seconds=1.0,
    body_timeout_seconds=1.0,
    body_min_bytes_per_second=1024,
)


@dataclasses.dataclass
class Served:
    address: tuple[str, int]
    key: str  # an API key


@pytest.fixture
async def served(sqlite_template: Path, tmp_path: Path) -> AsyncIterator[Served]:
    """A gateway served as ``hookline serve`` serves it (its uvicorn options), with LIMITS."""
    path = tmp_path / "hookline.db"
    shutil.copy(sqlite_template, path)
    settings = gateway_settings(f"sqlite:///{path}", "http://127.0.0.1:9/v1", http=LIMITS)
    gateway = Gateway(settings)
    await gateway.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        create_app(gateway, manage_gateway=False),
        log_level="error",
        ws="websockets-sansio",
        lifespan="off",
        timeout_graceful_shutdown=1,
        **server_options(settings),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
        await asyncio.sleep(0.01)
    try:
        yield Served(sock.getsockname(), await gateway.keys.create("acme"))
    finally:
        server.should_exit = True
        await task
        sock.close()
        await gateway.stop()


@contextlib.asynccontextmanager
async def connection(
    address: tuple[str, int],
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(*address)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def answer(reader: asyncio.StreamReader, within: float) -> tuple[int, bytes]:
    """The status and body of what the server sends before it closes the connection."""
    raw = await asyncio.wait_for(reader.read(), within)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    """Send ``data`` a byte at a time until the server hangs up."""
    with contextlib.suppress(OSError):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(every)


async def test_request_heads_past_max_header_bytes_are_431(served: Served) -> None:
    address = served.address
    headers = "".join(f"X-Filler-{i}: {'a' * 1000}\r\n" for i in range(12))  # ~12 KB
    async with connection(address) as (reader, writer):
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        status, body = await answer(reader, 5)
        assert status == 431
        assert json.loads(body)["type"] == "urn:hookline:problem:header-too-large"
    async with connection(address) as (reader, writer):  # one header that never ends
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"a" * 100_000)
        status, _ = await answer(reader, 5)
        assert status == 431
    async with connection(address) as (reader, writer):  # within the limit: served
        fits = "".join(f"X-Filler-{i}: {'a' * 1000}\r\n" for i in range(6))  # ~6 KB
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{fits}\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line.startswith(b"HTTP/1.1 200")
    url = f"ws://{address[0]}:{address[1]}/v1/jobs/job_x/ws?access_token={served.key}"
    async with websockets.connect(url) as websocket:  # an upgrade passes the guard
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(websocket.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


async def test_a_client_trickling_its_head_is_dropped(served: Served) -> None:
    address = served.address
    loop = asyncio.get_running_loop()
    async with connection(address) as (reader, writer):
        began = loop.time()
        sending = asyncio.create_task(
            trickle(writer, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 100, 0.2)
        )
        status, body = await answer(reader, 5)
        sending.cancel()
        assert status == 408 and b"request-timeout" in body
        assert loop.time() - began < 2.5  # header_timeout_seconds is 1
    async with connection(address) as (reader, writer):  # one that sends nothing at all
        began = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert loop.time() - began < 2.5


async def test_a_client_trickling_its_body_is_dropped_a_slow_honest_one_is_not(
    served: Served,
) -> None:
    loop = asyncio.get_running_loop()
    address, key = served.address, served.key
    messages = [{"role": "user", "content": "hi"}]
    body = json.dumps(
        {"operation": "chat.completions", "model": "m", "input": {"messages": messages}}
    ).encode()
    body += b" " * (3000 - len(body))
    head = (
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    async with connection(address) as (reader, writer):
        writer.write(head)
        began = loop.time()
        sending = asyncio.create_task(trickle(writer, body, 0.2))  # 5 bytes/s
        status, _ = await answer(reader, 5)
        sending.cancel()
        assert status == 408
        assert loop.time() - began < 2.5  # body_timeout_seconds is 1
    async with connection(address) as (reader, writer):  # 2,000 bytes/s: above the minimum
        writer.write(head)
        for start in range(0, len(body), 100):
            writer.write(body[start : start + 100])
            await asyncio.sleep(0.05)
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line.startswith(b"HTTP/1.1 202"), line
