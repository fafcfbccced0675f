"""Standard Webhooks: secrets, message bodies, signing, and verification for receivers.

A message is the JSON body ``{"type", "timestamp", "data"}`` sent with the headers ``webhook-id``
(stable across retries), ``webhook-timestamp`` (seconds) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``, several space-separated while a rotated secret
still signs). Receivers call :func:`verify`.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hmac
import secrets as _secrets
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from hookline.events import Event, EventType
from hookline.jobs import Job, iso, job_json

SECRET_PREFIX = "whsec_"
_JOB_TERMINAL = [e for e in EventType if e.is_terminal and e.value.startswith("job.")]
DEFAULT_JOB_EVENTS: tuple[str, ...] = tuple(sorted(e.value for e in _JOB_TERMINAL))
DEFAULT_BATCH_EVENTS: tuple[str, ...] = tuple(
    sorted(e.value for e in EventType if e.is_terminal and e.value.startswith("batch."))
)
# Events whose ``data`` is the whole job; batch events carry the batch, the others their own data.
_JOB_STATE_EVENTS = frozenset({EventType.QUEUED, EventType.STARTED, *_JOB_TERMINAL})
JOB_STATE_EVENT_TYPES = frozenset(e.value for e in _JOB_STATE_EVENTS)  # for hookline listen

__all__ = ["WebhookEvent", "WebhookVerificationError", "verify"]


def new_secret() -> str:
    """A new ``whsec_`` secret: 32 random bytes, base64."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(32)).decode()


def matches(filters: Iterable[str], event_type: str) -> bool:
    """Whether an event type passes a filter list (``*`` and ``job.*`` style wildcards allowed)."""
    for pattern in filters:
        if pattern == "*" or pattern == event_type:
            return True
        if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
            return True
    return False


def message_body(event: Event, job: Job | None) -> dict[str, Any]:
    """The body of the message that reports ``event``."""
    if job is not None and event.type in _JOB_STATE_EVENTS:
        data: dict[str, Any] = job_json(job)
    elif event.type.value.startswith("batch."):
        data = event.data
    else:
        data = {"job_id": event.job_id, "seq": event.seq, **event.data}
    return {"type": event.type.value, "timestamp": iso(event.created_at), "data": data}


@functools.lru_cache(maxsize=4096)
def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX) + "==")


def sign(message_id: str, timestamp: int, body: bytes, secrets: Iterable[str]) -> str:
    """The ``webhook-signature`` header: one ``v1,…`` signature per active secret.

    The HMAC is computed here (with each secret decoded once) rather than through
    ``standardwebhooks.Webhook``, which decodes the secret and re-encodes the body on every call;
    the tests check every signature with that package.
    """
    signed = f"{message_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.digest(_key(s), signed, "sha256")).decode() for s in secrets
    )


def headers_for(
    message_id: str, timestamp: int, body: bytes, secrets: Iterable[str]
) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(message_id, timestamp, body, secrets),
        "content-type": "application/json",
        "user-agent": "hookline-webhooks",
    }


@dataclasses.dataclass(frozen=True)
class WebhookEvent:
    """A verified message: its ``webhook-id``, type, timestamp and data."""

    id: str
    type: str
    timestamp: str
    data: dict[str, Any]


def verify(body: bytes | str, headers: Mapping[str, str], secret: str) -> WebhookEvent:
    """Check a received message's signature and age (5 minutes' tolerance) and parse it.

    Raises :class:`WebhookVerificationError` if the message was not signed with ``secret``, is too
    old or too new, or lacks the headers.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    text = body if isinstance(body, str) else body.decode()
    Webhook(secret).verify(text, lowered, json_parse=False)
    parsed = orjson.loads(text)
    return WebhookEvent(
        id=lowered["webhook-id"],
        type=parsed["type"],
        timestamp=parsed["timestamp"],
        data=parsed["data"],
    )
