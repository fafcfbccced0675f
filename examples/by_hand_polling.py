"""For comparison (docs/client.md): what a caller writes by hand to get a chat completion's result
delivered to a callback without hookline, against a plain OpenAI-compatible server. Timeouts,
retries with exponential backoff and jitter, Retry-After, a thread so the caller does not block.

It still holds a connection open for the whole generation, loses the call if this process dies,
and its callback carries no signature to verify. hookline's side of the same task:
examples/submit_and_webhook.py plus a receiver such as examples/receiver_flask.py.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

RETRYABLE = {408, 409, 429, 500, 502, 503, 504}


def call_with_retries(
    base_url: str,
    api_key: str,
    body: dict[str, Any],
    *,
    timeout: float = 600.0,
    attempts: int = 6,
    base_delay: float = 1.0,
    max_delay: float = 60.0,
) -> dict[str, Any]:
    delay = base_delay
    last_error: Exception | None = None
    for attempt in range(attempts):
        try:
            response = httpx.post(
                f"{base_url}/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {api_key}"},
                timeout=httpx.Timeout(timeout, connect=10.0),
            )
        except httpx.TransportError as exc:  # timeouts, refused and dropped connections
            last_error = exc
        else:
            if response.status_code < 400:
                result: dict[str, Any] = response.json()
                return result
            if response.status_code not in RETRYABLE:
                response.raise_for_status()
            last_error = RuntimeError(f"upstream answered {response.status_code}")
            retry_after = response.headers.get("retry-after", "")
            if retry_after.isdigit():
                delay = max(delay, float(retry_after))
        if attempt == attempts - 1:
            break
        time.sleep(min(max_delay, delay) * random.uniform(0.8, 1.2))
        delay = min(max_delay, delay * 2)
    raise RuntimeError(f"gave up after {attempts} attempts") from last_error


def submit(
    base_url: str,
    api_key: str,
    body: dict[str, Any],
    on_done: Callable[[dict[str, Any]], None],
    on_error: Callable[[Exception], None],
) -> threading.Thread:
    def run() -> None:
        try:
            on_done(call_with_retries(base_url, api_key, body))
        except Exception as exc:
            on_error(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
