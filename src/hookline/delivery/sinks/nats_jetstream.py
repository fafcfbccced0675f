"""NATS JetStream (``nats-py``): a publish to the subject ``target``, acknowledged by the stream,
with ``Nats-Msg-Id`` = the message id, so the server drops a resend within the stream's duplicate
window (exactly-once publish). With ``create`` the stream (``stream``, default the sink's name) is
added when no stream takes the subject."""

from __future__ import annotations

import logging
import re
from typing import Any

from hookline.delivery.sinks.base import Sink, SinkMessage, require

log = logging.getLogger("hookline.sinks")


class NatsSink(Sink):
    _nc: Any = None
    _js: Any = None

    async def _connect(self) -> Any:
        async with self.connecting:
            if self._js is None:
                await self._open()
        return self._js

    async def _open(self) -> None:
        nats = require("nats", "nats")
        errors = require("nats.js.errors", "nats")
        errors_module = require("nats.errors", "nats")
        timeout = self.config.timeout_seconds
        last_error: Exception | None = None

        async def failed(exc: Exception) -> None:  # instead of nats-py's traceback in the log
            nonlocal last_error
            if self._nc is None:  # connecting: the failure is raised below
                last_error = exc
            else:
                log.warning("NATS sink %s: %s", self.config.name, exc)

        # Fail at once when the broker is down: retrying is the sender's, with its backoff, and a
        # dropped connection is made anew by the next publish (after reset), not by nats-py.
        # nats-py retries a first connect forever, ``reconnect_time_wait`` apart, when
        # ``max_reconnect_attempts`` is 0, even without ``allow_reconnect`` (nats-io/nats.py#645),
        # so each try hung until the publish timed out; 1 with no wait gives up after a second
        # immediate try.
        try:
            self._nc = await nats.connect(
                self.config.url,
                connect_timeout=timeout,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                error_cb=failed,
            )
        except errors_module.NoServersError as exc:
            cause = last_error or exc
            raise ConnectionError(f"cannot connect to NATS: {cause}") from cause
        js = self._nc.jetstream(timeout=timeout)
        if self.config.create:
            try:
                await js.find_stream_name_by_subject(self.config.target)
            except errors.NotFoundError:
                name = self.config.stream or re.sub(r"[^A-Za-z0-9_-]", "_", self.config.name)
                await js.add_stream(name=name, subjects=[self.config.target])
        self._js = js

    async def publish(self, message: SinkMessage) -> None:
        js = self._js or await self._connect()
        headers = {"Nats-Msg-Id": message.id, **message.headers}
        await js.publish(self.config.target, message.body, headers=headers)

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            await nc.close()
