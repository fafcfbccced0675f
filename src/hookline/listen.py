"""``hookline listen``: webhooks on a developer's machine, without a public URL.

It follows the tenant's event stream (``GET /v1/events``) and re-delivers each event to a local
URL as a real webhook would arrive: the same body (``{type, timestamp, data}``, the job as the
API shows it for job events), the same Standard Webhooks headers, signed with the tenant's
secret, so the receiver's verification code is exercised as it will be in production. Each
delivery's status is reported as it happens. The last event handled is kept in a state file, so a
restart picks up where it stopped; the ``webhook-id`` of an event is stable, so a receiver
deduplicates a re-delivery.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

from hookline.client import _raise_for, _SSEDecoder
from hookline.webhooks import JOB_STATE_EVENT_TYPES, headers_for

_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True)
class Delivery:
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
    def __init__(
        self,
        client: httpx.Client,
        forward_to: str,
        *,
        events: list[str] | None = None,
        state_file: Path,
        forwarder: httpx.Client | None = None,
    ) -> None:
        self.client = client  # authenticated, with the gateway as its base URL
        self.forward_to = forward_to
        self.events = events or []
        self.state_file = state_file
        self.forwarder = forwarder or httpx.Client(timeout=10)
        self._secret: str | None = None

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

    def run(self, report: Callable[[Delivery], None], *, limit: int | None = None) -> None:
        """Forward until interrupted (or ``limit`` deliveries); reconnects after a drop."""
        for done, (event_id, body) in enumerate(self._events(), start=1):
            report(self._forward(event_id, body))
            self._remember(event_id)
            if limit is not None and done >= limit:
                return

    def _events(self) -> Iterator[tuple[int, dict[str, Any]]]:
        while True:
            params = {"after": self.last_event_id(), "type": list(self.events)}
            try:
                with self.client.stream(
                    "GET", "/v1/events", params=params,
                    headers={"Accept": "text/event-stream"}, timeout=None,
                ) as response:  # fmt: skip
                    if response.status_code >= 400:
                        response.read()
                        _raise_for(response)
                    decoder = _SSEDecoder()
                    for line in response.iter_lines():
                        message = decoder.feed(line)
                        if message is not None:
                            yield int(message["id"]), orjson.loads(message["data"])
            except httpx.TransportError:
                time.sleep(1)  # the gateway restarted: resume from the state file

    def _secret_value(self) -> str:
        if self._secret is None:
            response = self.client.get("/v1/webhook-secret")
            _raise_for(response)
            self._secret = str(response.json()["secret"])
        return self._secret

    def _message(self, event: dict[str, Any]) -> dict[str, Any]:
        """The body a real webhook would carry for this event (see webhooks.message_body)."""
        kind = event["type"]
        if kind in JOB_STATE_EVENT_TYPES:
            response = self.client.get(f"/v1/jobs/{event['job_id']}")
            data = response.json() if response.status_code == 200 else event["data"]
        elif kind.startswith("batch."):
            data = event["data"]
        else:
            data = {"job_id": event["job_id"], "seq": event["seq"], **event["data"]}
        return {"type": kind, "timestamp": event["created_at"], "data": data}

    def _forward(self, event_id: int, event: dict[str, Any]) -> Delivery:
        body = orjson.dumps(self._message(event))
        message_id = f"msg_listen_{event_id}"
        error = None
        for attempt in range(_ATTEMPTS):
            headers = headers_for(message_id, int(time.time()), body, [self._secret_value()])
            started = time.perf_counter()
            try:
                answer = self.forwarder.post(self.forward_to, content=body, headers=headers)
            except httpx.HTTPError as exc:
                error = str(exc) or type(exc).__name__
                time.sleep(0.5 * 2**attempt)
                continue
            millis = (time.perf_counter() - started) * 1000
            return Delivery(event_id, event["type"], event["job_id"], answer.status_code, millis)
        return Delivery(event_id, event["type"], event["job_id"], None, 0.0, error)
