"""Standard Webhooks signing, for the sender: a message is the JSON body ``{"type",
"timestamp", "data"}`` sent with the headers ``webhook-id`` (stable across retries),
``webhook-timestamp`` (seconds) and ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of
"id.timestamp.body">``, several space-separated while a rotated secret still signs). Receivers
verify with :func:`hookline.client.webhooks.verify`."""

from __future__ import annotations

import base64
import functools
import hmac
from collections.abc import Iterable

from hookline.deliveries import SECRET_PREFIX


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


def verify(secret: str, message_id: str, timestamp: str, body: bytes, signatures: str) -> bool:
    """Whether one of the ``webhook-signature`` header's ``v1,`` signatures is the one
    ``secret`` gives this message (compared in constant time). A secret that is not base64
    verifies nothing."""
    try:
        key = _key(secret)
    except ValueError:
        return False
    signed = f"{message_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.digest(key, signed, "sha256"))
    for signature in signatures.split():
        version, _, value = signature.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            return True
    return False
