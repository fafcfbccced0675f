"""Live messages between processes on one machine that share a SQLite file.

``hookline api`` and ``hookline worker`` share only the database, and the store holds output text
only once the worker writes it (every ``delta_flush_seconds``). So that a stream served by the API
process still gets each chunk the moment the upstream produced it, every process with a worker
runs a :class:`RelayServer` on a Unix socket in a directory named after the database file, and
every process serving the API runs a :class:`RelayClient` that connects to each such socket and
feeds what arrives into its own :class:`~hookline.live.LiveHub`. Messages are JSON lines.

Nothing depends on the relay for correctness: a message it loses (a process restarting, a slow
reader cut off) is still in the store, where streams find it (see :mod:`hookline.delivery.streams`); a
connection that begins or ends has the tenant streams re-read the store at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import orjson

from hookline.events import Event, EventType
from hookline.live.hub import LiveDelta, LiveHub, Message

log = logging.getLogger("hookline.live.relay")
_SCAN_SECONDS = 0.5
_MAX_BUFFERED = 4 * 1024 * 1024  # a reader this far behind is dropped (and reconnects)


def relay_directory(database_path: str) -> Path:
    """Where the sockets of processes sharing ``database_path`` live (short: the socket path
    limit is 108 bytes)."""
    digest = hashlib.sha256(os.path.abspath(database_path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"hookline-live-{digest}"


def pack(message: Message) -> dict[str, Any]:
    """A message as plain JSON data (the relays' wire format)."""
    if isinstance(message, LiveDelta):
        return {
            "d": [
                message.job_id,
                message.tenant,
                message.attempt,
                message.index,
                message.offset,
                message.text,
            ]
        }
    return {
        "e": [message.id, message.job_id, message.tenant, message.seq, message.type.value,
              message.data, message.created_at]
    }  # fmt: skip


def unpack(body: dict[str, Any]) -> Message:
    if "d" in body:
        job_id, tenant, attempt, index, offset, text = body["d"]
        return LiveDelta(job_id, tenant, attempt, index, offset, text)
    event_id, job_id, tenant, seq, type_, data, created_at = body["e"]
    return Event(event_id, job_id, tenant, seq, EventType(type_), data, created_at)


def encode(message: Message) -> bytes:
    return orjson.dumps(pack(message)) + b"\n"


def decode(line: bytes) -> Message:
    return unpack(orjson.loads(line))


class RelayServer:
    """Sends every message this process's hub publishes to the connected API processes."""

    def __init__(self, hub: LiveHub, directory: Path) -> None:
        self.hub = hub
        self.path = directory / f"{os.getpid()}.sock"
        self._server: asyncio.Server | None = None
        self._readers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        _remove(self.path)  # left by an earlier process with this pid
        self._server = await asyncio.start_unix_server(self._connected, path=str(self.path))
        self.hub.taps.append(self._send)

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.hub.taps.remove(self._send)
        if self._server is not None:
            self._server.close()
        for writer in list(self._readers):
            writer.close()
        _remove(self.path)
        directory = self.path.parent
        if not _sockets(directory):  # the last process of this database leaves nothing behind:
            for mark in directory.glob("*.mark"):  # hookline.live.marks (a process still
                _remove(mark)  # watching one takes its removal as news, which costs nothing)
            with contextlib.suppress(OSError):
                directory.rmdir()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A process joining mid-stream first gets the text its watchers would otherwise wait for.
        writer.write(b"".join(encode(delta) for delta in self.hub.live_text()))
        self._readers.add(writer)
        try:
            await reader.read()  # until the other side goes away; it sends nothing
        except OSError:
            pass
        finally:
            self._readers.discard(writer)
            writer.close()

    def _send(self, message: Message) -> None:
        if not self._readers:
            return
        line = encode(message)
        for writer in list(self._readers):
            if writer.transport.get_write_buffer_size() > _MAX_BUFFERED:
                self._readers.discard(writer)
                writer.close()
                continue
            writer.write(line)


class RelayClient:
    """Connects to every relay socket of the directory (but this process's own) and publishes
    what arrives into this process's hub."""

    def __init__(self, hub: LiveHub, directory: Path) -> None:
        self.hub = hub
        self.directory = directory
        self.own = directory / f"{os.getpid()}.sock"
        self._connections: dict[Path, asyncio.Task[None]] = {}
        self._refused: set[Path] = set()
        self._scanner: asyncio.Task[None] | None = None
        self.scanned = asyncio.Event()

    async def start(self) -> None:
        self._scanner = asyncio.create_task(self._scan_loop(), name="hookline-relay-scan")

    async def stop(self) -> None:
        tasks = [t for t in [self._scanner, *self._connections.values()] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _scan_loop(self) -> None:
        while True:
            for path in _sockets(self.directory):
                if path != self.own and path not in self._connections:
                    self._connections[path] = asyncio.create_task(self._follow(path))
            self.scanned.set()
            await asyncio.sleep(_SCAN_SECONDS)

    async def _follow(self, path: Path) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=2**24)
        except ConnectionRefusedError:
            # Nobody listens: a process that died without cleaning up, or one that has bound its
            # socket but not yet listens. Only a socket refused a second time, a scan later, is
            # removed.
            if path in self._refused:
                _remove(path)
                self._refused.discard(path)
            else:
                self._refused.add(path)
            self._connections.pop(path, None)
            return
        except OSError:
            self._connections.pop(path, None)
            return
        self._refused.discard(path)
        log.info("live relay: following %s", path.name)
        # What the process published before this connection (or after it broke) never comes:
        # the tenant streams, which wait for messages rather than re-reading, look for it.
        self.hub.poke_tenants()
        try:
            while line := await reader.readline():
                message = decode(line)
                if isinstance(message, LiveDelta):
                    self.hub.publish_delta(message, relayed=True)
                else:
                    self.hub.publish_events([message], relayed=True)
        except (OSError, ValueError) as exc:
            log.debug("relay %s ended: %s", path, exc)
        finally:
            writer.close()
            self._connections.pop(path, None)
            self.hub.poke_tenants()


def _sockets(directory: Path) -> list[Path]:
    try:
        return list(directory.glob("*.sock"))
    except OSError:
        return []


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
