"""A webhook receiver in FastAPI: verifies hookline's signature, dedupes on webhook-id, answers fast.

From the checkout's folder, with hookline running (``hookline serve --dev``) and HOOKLINE_API_KEY
set (docs/quickstart.md):

    HOOKLINE_WEBHOOK_SECRET=$(.venv/bin/hookline webhooks secret) .venv/bin/uvicorn examples.receiver_fastapi:app --port 3000

It prints each message it verified; ``examples/submit_and_webhook.py http://localhost:3000/hook``
sends it one. ``hookline webhooks secret`` is ``GET /v1/webhook-secret``, the secret of per-job
webhook URLs; a registered endpoint has its own (``GET /v1/webhook-endpoints/{id}/secret``).
"""

from __future__ import annotations

import os

from fastapi import FastAPI, HTTPException, Request

from hookline.client.webhooks import WebhookEvent, WebhookVerificationError, verify

app = FastAPI()
received: list[WebhookEvent] = []  # stands in for your database
seen_ids: set[str] = set()


@app.post("/hook")
async def hook(request: Request) -> dict[str, str]:
    secret = os.environ["HOOKLINE_WEBHOOK_SECRET"]
    try:
        event = verify(await request.body(), dict(request.headers), secret)
    except WebhookVerificationError as exc:
        raise HTTPException(status_code=400, detail=f"bad signature: {exc}") from exc
    if event.id in seen_ids:  # delivery is at least once: a retry may repeat a message
        return {"status": "duplicate"}
    seen_ids.add(event.id)
    received.append(event)
    print(f"verified {event.type} of {event.data.get('id')}", flush=True)
    return {"status": "ok"}
