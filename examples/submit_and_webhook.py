"""Submit a chat completion and be called back when it is done: no polling, no held connection.

From the checkout's folder, with hookline running and HOOKLINE_API_KEY set (docs/quickstart.md;
HOOKLINE_URL too if it is not on http://127.0.0.1:8000), and one of the receivers
(receiver_fastapi.py, receiver_flask.py, receiver_django.py) on port 3000:

    .venv/bin/python examples/submit_and_webhook.py http://localhost:3000/hook

A webhook may go to localhost because the quickstart runs ``hookline serve --dev``; in
production the URL is a public one. ``hookline listen --forward-to URL`` is the other way to get
your events to a local receiver, from a gateway elsewhere.
"""

from __future__ import annotations

import sys

from hookline.client import Client


def main(webhook_url: str, model: str = "local") -> str:
    with Client() as client:  # HOOKLINE_URL and HOOKLINE_API_KEY
        job = client.submit(
            "chat.completions",
            {"messages": [{"role": "user", "content": "Write a haiku about queues."}],
             "max_tokens": 40},
            model=model,
            webhook=webhook_url,  # job.succeeded (or failed, …) is POSTed there, signed
        )  # fmt: skip
    print(f"submitted {job.id}; the answer will arrive at {webhook_url}")
    return job.id


if __name__ == "__main__":
    main(sys.argv[1])
