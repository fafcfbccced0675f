"""What every sink kind implements, and the message it is handed.

A sink publishes one message at a time and raises on failure (any exception: the sender records
the attempt as failed and retries it on the schedule). It connects on first use and again after a
failure (:meth:`Sink.reset`), so a broker that is down when the process starts, or goes away and
comes back, costs retries, never a lost message.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from typing import Any

import orjson

from hookline.config import SinkConfig


class SinkError(Exception):
    """A sink that cannot be used as configured (a missing extra, a target outside its directory)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SinkMessage:
    """One outbox message as a sink publishes it. ``id`` is stable across retries (the webhook
    ``webhook-id``): consumers dedupe on it. ``body`` is the webhook body (``{"type",
    "timestamp", "data"}``) or, with ``envelope = "cloudevents"``, the CloudEvent; ``headers`` are
    the message headers for brokers that have them (the Standard Webhooks signature headers, or
    the CloudEvents binary-mode ``ce-*`` ones)."""

    id: str
    event_type: str
    job_id: str | None
    tenant: str
    timestamp: str  # ISO 8601, the event's
    payload: dict[str, Any]  # the webhook body
    body: bytes
    headers: dict[str, str]

    @property
    def data_json(self) -> bytes:
        return orjson.dumps(self.payload.get("data"))


class Sink(abc.ABC):
    """One configured sink; :meth:`publish` is called by one sender, possibly concurrently."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self.connecting = asyncio.Lock()  # sends starting together make one connection

    @abc.abstractmethod
    async def publish(self, message: SinkMessage) -> None:
        """Write ``message`` durably (acknowledged by the broker, committed, fsynced); raise if
        that cannot be confirmed."""

    async def reset(self) -> None:
        """Drop the connection after a failure: the next publish connects anew."""
        await self.close()

    @abc.abstractmethod
    async def close(self) -> None:
        """Let go of every connection and file; safe to call twice."""


def require(module: str, extra: str) -> Any:
    """Import a sink's client library, or say which extra brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SinkError(
            f"the {extra} sink needs {module}: pip install 'hookline[{extra}]'"
        ) from exc
