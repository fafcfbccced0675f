"""Receiver-side verification at its documented place: ``from hookline.webhooks import verify``.
The code is :mod:`hookline.client.webhooks`, which loads none of the server."""

from hookline.client.webhooks import WebhookEvent, WebhookVerificationError, verify

__all__ = ["WebhookEvent", "WebhookVerificationError", "verify"]
