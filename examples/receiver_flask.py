"""A webhook receiver in Flask: verifies hookline's signature, dedupes on webhook-id, answers fast.

From the checkout's folder, with hookline running (``hookline serve --dev``) and HOOKLINE_API_KEY
set (docs/quickstart.md); it prints each message it verified:

    HOOKLINE_WEBHOOK_SECRET=$(.venv/bin/hookline webhooks secret) .venv/bin/flask --app examples.receiver_flask run --port 3000
"""

from __future__ import annotations

import os

from flask import Flask, abort, request

from hookline.client.webhooks import WebhookEvent, WebhookVerificationError, verify

app = Flask(__name__)
received: list[WebhookEvent] = []  # stands in for your database
seen_ids: set[str] = set()


@app.post("/hook")
def hook() -> dict[str, str]:
    secret = os.environ["HOOKLINE_WEBHOOK_SECRET"]
    try:
        event = verify(request.get_data(), dict(request.headers), secret)
    except WebhookVerificationError:
        abort(400)
    if event.id in seen_ids:  # delivery is at least once: a retry may repeat a message
        return {"status": "duplicate"}
    seen_ids.add(event.id)
    received.append(event)
    print(f"verified {event.type} of {event.data.get('id')}", flush=True)
    return {"status": "ok"}
