"""Verifying a hookline webhook in a receiver (Standard Webhooks): :func:`verify` checks a
message's signature and age and parses it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

__all__ = ["WebhookEvent", "WebhookVerificationError", "verify"]


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
    parsed = json.loads(text)
    return WebhookEvent(
        id=lowered["webhook-id"],
        type=parsed["type"],
        timestamp=parsed["timestamp"],
        data=parsed["data"],
    )
