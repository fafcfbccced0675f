"""A webhook receiver on loopback that records every request and answers as scripted."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from aiohttp import web


@dataclasses.dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]


@dataclasses.dataclass
class Answer:
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    body: str = "ok"


class WebhookReceiver:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.answers: dict[str, list[Answer]] = {}
        self.active = 0
        self.max_active = 0
        self.started = 0  # requests whose handling began (the body has arrived)
        self.base_url = ""
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    def script(self, path: str, *answers: Answer) -> None:
        """Answer requests to ``path`` with these, one each; the last one repeats."""
        self.answers[path] = list(answers)

    def url(self, path: str = "/hook") -> str:
        return self.base_url + path

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def wait_for(self, path: str, count: int, timeout: float = 15) -> list[Received]:
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.at(path)) >= count)
        return self.at(path)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, handle_signals=False, shutdown_timeout=0.5, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server
        self.base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.started += 1
        answers = self.answers.get(request.path) or [Answer()]
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if answer.delay:
                await asyncio.sleep(answer.delay)
        finally:
            self.active -= 1
            await self._record(request, body)
        return web.Response(status=answer.status, text=answer.body, headers=answer.headers)

    async def _record(self, request: web.Request, body: bytes) -> None:
        async with self._arrived:
            self.received.append(
                Received(request.path, dict(request.headers), body, time.monotonic())
            )
            self._arrived.notify_all()
