"""A JSON Lines file: ``url = "file:///var/lib/hookline/sinks"`` is the directory, ``target`` a
file name inside it (never a path out of it). One line per message, ``{"id", "headers", ...the
body}`` (with ``envelope = "cloudevents"``, the structured CloudEvent), appended and fsynced
before it counts; past ``rotate_bytes`` the file is renamed to
``<target>.<epoch ms>`` and a new one begun."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.parse
from pathlib import Path

import orjson

from hookline.config import SinkConfig
from hookline.delivery.sinks.base import Sink, SinkError, SinkMessage


def directory_of(url: str) -> Path:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        raise SinkError(f"a jsonl sink's url is file:///a/directory, not {url!r}")
    return Path(urllib.parse.unquote(parts.path))


class JsonlSink(Sink):
    def __init__(self, config: SinkConfig) -> None:
        super().__init__(config)
        self.directory = directory_of(config.url)
        self.path = self.directory / config.target
        if self.path.parent != self.directory:
            raise SinkError(f"a jsonl sink's target is a file name, not {config.target!r}")
        self._lock = asyncio.Lock()

    async def publish(self, message: SinkMessage) -> None:
        if self.config.envelope == "cloudevents":
            line = message.body  # a structured CloudEvent per line
        else:
            line = orjson.dumps({"id": message.id, "headers": message.headers, **message.payload})
        async with self._lock:  # whole lines, in the order they were handed over
            await asyncio.to_thread(self._append, line + b"\n")

    def _append(self, line: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(line) > self.config.rotate_bytes:
            os.replace(
                self.path, self.path.with_name(f"{self.path.name}.{int(time.time() * 1000)}")
            )
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    async def close(self) -> None:
        return None
