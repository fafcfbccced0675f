"""The HTTP server's limits on hostile clients, below the ASGI app: what uvicorn lacks.

uvicorn's default HTTP implementation (httptools, on llhttp) bounds nothing before a request
reaches the app: a request head of any size is buffered (h11 has ``h11_max_incomplete_event_size``;
llhttp took a 10 MB header), a connection that sends nothing, or a byte every few seconds, is kept
for ever (``timeout_keep_alive`` runs only between requests), and so is a body that trickles in.
:class:`GuardedHttpToolsProtocol` adds, per ``[http]`` settings (:class:`~hookline.config.HttpConfig`):

- the head (request line and headers) at most ``max_header_bytes``: 431, checked while it arrives;
- the head complete within ``header_timeout_seconds`` of its first byte (of the connection, for
  its first request): 408, and the connection is closed;
- a request that is not HTTP (a malformed request line or header): 400, and the connection is
  closed, as uvicorn does, but with a problem rather than plain text;
- a body still arriving after ``body_timeout_seconds`` at less than ``body_min_bytes_per_second``
  on average: 408 if no answer started, and the connection is closed (the app sees a
  disconnect). Time in which the app did not read (reading paused) does not count.

Most requests arrive whole in one read and cost no timer: one is set only for a head or a body
still arriving after a read (and for a new connection's first request).
"""

from __future__ import annotations

import asyncio
import http
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hookline.api.problems import problem
from hookline.config import HttpConfig, Settings

_RECHECK_SECONDS = 0.5  # a slow body's rate is looked at again no sooner than this


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; the refusal is answered by uvicorn's error
    path (:meth:`GuardedHttpToolsProtocol.send_400_response`)."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    limits: ClassVar[HttpConfig] = HttpConfig()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # between requests, or reading one's head
        self._head_bytes = 0  # bytes received since the head began (a whole read each)
        self._head_began = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_body = False
        self._body_began = 0.0
        self._body_bytes = 0
        self._body_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str, str] | None = None

    # --- the connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_began = self.loop.time()
        self._head_timer = self.loop.call_at(
            self._head_began + self.limits.header_timeout_seconds, self._head_late
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            if not self._head_bytes and self._head_timer is None:
                self._head_began = self.loop.time()
            self._head_bytes += len(data)
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._in_head and self._head_bytes:  # a head still arriving
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(431, "header-too-large", self._head_too_large())
            elif self._head_timer is None:
                self._head_timer = self.loop.call_at(
                    self._head_began + self.limits.header_timeout_seconds, self._head_late
                )
        elif self._in_body and self._body_timer is None:  # a body still arriving
            self._body_began = self.loop.time()
            self._body_timer = self.loop.call_at(
                self._body_began + self.limits.body_timeout_seconds, self._check_body
            )

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers what it cannot parse in plain text: ours is a problem, as every refusal.
        detail = f"the request is not valid HTTP/1.1 (a malformed request line or header): {msg}"
        self._refuse(*(self._refusal or (400, "malformed-request", detail)))

    # --- parser callbacks

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        limit = self.limits.max_header_bytes
        # What came since the head began may hold the start of the body too: then count exactly.
        if self._head_bytes > limit and self._head_size() > limit:
            self._refusal = (431, "header-too-large", self._head_too_large())
            raise _Refused
        self._head_bytes = 0
        super().on_headers_complete()
        if not self.parser.should_upgrade():  # (a WebSocket is not a body)
            self._in_body = True
            self._body_bytes = 0

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._in_head = True
        super().on_message_complete()

    # --- the limits

    def _head_size(self) -> int:
        """The request line and headers as parsed (without the method and version)."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _head_too_large(self) -> str:
        return f"the request's headers are larger than {self.limits.max_header_bytes} bytes"

    def _head_late(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_bytes:
            detail = (
                f"the request's headers took longer than {self.limits.header_timeout_seconds:g} s"
            )
            self._refuse(408, "request-timeout", detail)
        else:  # nothing sent since the connection opened: nobody to tell
            self.transport.close()

    def _check_body(self) -> None:
        self._body_timer = None
        if not self._in_body or self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused:  # the app has not read what came: not the client's fault
            self._body_began, self._body_bytes = now, 0
            self._body_timer = self.loop.call_at(
                now + self.limits.body_timeout_seconds, self._check_body
            )
            return
        rate = self.limits.body_min_bytes_per_second
        fast_enough_until = self._body_began + self._body_bytes / rate
        if fast_enough_until > now:
            self._body_timer = self.loop.call_at(
                max(fast_enough_until, now + _RECHECK_SECONDS), self._check_body
            )
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            detail = f"the request's body came slower than {rate} bytes/s"
            self._write_problem(408, "request-timeout", detail)
        if cycle is not None:
            cycle.disconnected = True  # the app stops: its receive says so, its send is dropped
            cycle.message_event.set()
        self.transport.close()

    def _refuse(self, status: int, slug: str, detail: str) -> None:
        """Answer a request the app never saw, and close the connection."""
        self._write_problem(status, slug, detail)
        self.transport.close()

    def _write_problem(self, status: int, slug: str, detail: str) -> None:
        phrase = http.HTTPStatus(status).phrase
        response = problem(status, detail, slug=slug, title=phrase)
        head = [f"HTTP/1.1 {status} {phrase}".encode()]
        head += [name + b": " + value for name, value in self.server_state.default_headers]
        head += [name + b": " + value for name, value in response.raw_headers]
        head.append(b"connection: close")
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + bytes(response.body))

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None


def http_protocol(limits: HttpConfig) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for uvicorn's ``http`` option, with these limits."""

    class Guarded(GuardedHttpToolsProtocol):
        pass

    Guarded.limits = limits
    return Guarded


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn options for serving hookline (``uvicorn.Config(app, **server_options(...))``)."""
    return {"http": http_protocol(settings.http)}
