"""A webhook receiver in FastAPI: verifies hookline's signature, dedupes on webhook-id, answers fast.

    HOOKLINE_WEBHOOK_SECRET=whsec_... uvicorn examples.receiver_fastapi:app --port 3000

Get the secret with ``GET /v1/webhook-secret`` (per-job webhook URLs) or
``GET /v1/webhook-endpoints/{id}/secret`` (a registered endpoint).
"""

from __future__ import annotations

import os

from fastapi import FastAPI, HTTPException, Request

from hookline.webhooks import WebhookEvent, WebhookVerificationError, verify

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
    if event.type == "job.succeeded":
        answer = event.data["output"]["choices"][0]["message"]["content"]
        print(f"job {event.data['id']} answered: {answer}")
    return {"status": "ok"}
