"""Webhooks: Standard Webhooks signing (:mod:`.signing`), the sender that works through the
outbox (:mod:`.sender`), and the address policy that keeps it off private networks (:mod:`.ssrf`).
Which events an endpoint gets and the message bodies are the domain's (:mod:`hookline.deliveries`)."""
