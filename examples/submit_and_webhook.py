"""Submit a chat completion and be called back when it is done: no polling, no held connection.

    HOOKLINE_URL=http://127.0.0.1:8000 HOOKLINE_API_KEY=hk_... \\
        python examples/submit_and_webhook.py http://your-receiver.example/hook

Run one of the receivers next to it (receiver_fastapi.py, receiver_flask.py, receiver_django.py)
with the secret from ``GET /v1/webhook-secret``; or, on a laptop, ``hookline listen
--forward-to http://localhost:3000/hook`` delivers to the local receiver.
"""

from __future__ import annotations

import sys

from hookline import Client


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
