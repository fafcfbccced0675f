"""A batch: many requests in one call, then the results in input order.

From the checkout's folder, with hookline running and HOOKLINE_API_KEY set (docs/quickstart.md;
HOOKLINE_URL too if it is not on http://127.0.0.1:8000):

    .venv/bin/python examples/batch.py
"""

from __future__ import annotations

from hookline.client import Client


def main(
    model: str = "local", questions: tuple[str, ...] = ("2+2?", "Capital of France?")
) -> dict[str, str]:
    lines = [
        {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": 16}}
        for i, q in enumerate(questions)
    ]  # fmt: skip
    answers = {}
    with Client() as client:
        batch = client.submit_batch(lines)  # add webhook="https://…" to be called back instead
        batch = client.wait_batch(batch, timeout=600)
        print(f"{batch.id} {batch.status}: {batch.completed} completed, {batch.failed} failed")
        for result in client.batch_results(batch):
            if result.ok and result.body:
                answers[result.custom_id] = result.body["choices"][0]["message"]["content"]
            else:
                answers[result.custom_id] = f"error: {result.error or result.body}"
    for custom_id, answer in answers.items():
        print(f"{custom_id}: {answer}")
    return answers


if __name__ == "__main__":
    main()
