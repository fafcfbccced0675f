"""``hookline listen``: webhooks on a developer's machine, without a public URL.

It follows the tenant's event stream (:meth:`Client.events`) and re-delivers each event to a local
URL as a real webhook would arrive: the same body (``{type, timestamp, data}``, the job as the
API shows it for job events), the same Standard Webhooks headers, signed with the tenant's
secret, so the receiver's verification code is exercised as it will be in production. Each
delivery's status is reported as it happens. The last event handled is kept in a state file, so a
restart picks up where it stopped; the ``webhook-id`` of an event is stable, so a receiver
deduplicates a re-delivery.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook

from hookline.client._core import backoff
from hookline.client.errors import ClientError
from hookline.client.models import Event
from hookline.client.sync import Client

# The events whose webhook carries the whole job as ``data`` (the server's
# hookline.deliveries.JOB_STATE_EVENT_TYPES; a test keeps the two the same).
JOB_STATE_EVENT_TYPES = frozenset(
    {"job.queued", "job.started", "job.succeeded", "job.failed", "job.cancelled", "job.expired"}
)
_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True)
class Forwarded:
    """One event delivered to the local URL, and what came of it."""

    event_id: int
    type: str
    subject: str
    status: int | None  # None: the local URL could not be reached
    millis: float
    error: str | None = None


def default_state_file(url: str, api_key: str, forward_to: str) -> Path:
    digest = hashlib.sha256(f"{url}|{api_key}|{forward_to}".encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "hookline" / f"listen-{digest}.json"


class Listener:
    """Forwards the events of ``client``'s tenant to ``forward_to``."""

    def __init__(
        self,
        client: Client,
        forward_to: str,
        *,
        events: list[str] | None = None,
        state_file: Path,
        forwarder: httpx.Client | None = None,
    ) -> None:
        self.client = client
        self.forward_to = forward_to
        self.events = events or []
        self.state_file = state_file
        self.forwarder = forwarder or httpx.Client(timeout=10)
        self._signer: Webhook | None = None

    def last_event_id(self) -> str:
        try:
            return str(json.loads(self.state_file.read_text())["after"])
        except (OSError, ValueError, KeyError):
            return "latest"  # a first start: only what happens from now on

    def _remember(self, event_id: int) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps({"after": event_id}))
        temporary.replace(self.state_file)

    def run(self, report: Callable[[Forwarded], None], *, limit: int | None = None) -> None:
        """Forward until interrupted (or ``limit`` deliveries); reconnects after a drop."""
        for done, event in enumerate(self._events(), start=1):
            assert event.id is not None  # the tenant stream's ids are event ids
            report(self._forward(int(event.id), event))
            self._remember(int(event.id))
            if limit is not None and done >= limit:
                return

    def _events(self) -> Iterator[Event]:
        while True:
            try:
                yield from self.client.events(after=self.last_event_id(), types=self.events)
            except httpx.TransportError:
                time.sleep(1)  # the gateway is restarting: resume from the state file

    def _sign(self, message_id: str, timestamp: int, body: bytes) -> str:
        if self._signer is None:
            self._signer = Webhook(self.client.webhook_secret())
        when = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
        return self._signer.sign(message_id, when, body)

    def _message(self, event: Event) -> dict[str, Any]:
        """The body a real webhook would carry for this event (see webhooks.message_body)."""
        data: dict[str, Any] = event.data
        if event.type in JOB_STATE_EVENT_TYPES and event.job_id is not None:
            with contextlib.suppress(ClientError):  # gone (retention): the event's own data
                data = self.client.get(event.job_id).raw
        elif not event.type.startswith("batch."):
            data = {"job_id": event.job_id, "seq": event.seq, **event.data}
        return {"type": event.type, "timestamp": event.created_at, "data": data}

    def _forward(self, event_id: int, event: Event) -> Forwarded:
        body = json.dumps(self._message(event), separators=(",", ":"), ensure_ascii=False).encode()
        message_id = f"msg_listen_{event_id}"
        subject = event.job_id or ""
        error = None
        for attempt in range(_ATTEMPTS):
            timestamp = int(time.time())
            headers = {
                "webhook-id": message_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": self._sign(message_id, timestamp, body),
                "content-type": "application/json",
                "user-agent": "hookline-webhooks",
            }
            started = time.perf_counter()
            try:
                answer = self.forwarder.post(self.forward_to, content=body, headers=headers)
            except httpx.HTTPError as exc:
                error = str(exc) or type(exc).__name__
                time.sleep(backoff(attempt))  # the client's one schedule
                continue
            millis = (time.perf_counter() - started) * 1000
            return Forwarded(event_id, event.type, subject, answer.status_code, millis)
        return Forwarded(event_id, event.type, subject, None, 0.0, error)
