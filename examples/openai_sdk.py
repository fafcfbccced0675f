"""The official OpenAI SDK against hookline: change base_url and api_key, nothing else. Each call
is a durable job (its id in the ``Hookline-Job-Id`` header) that outlives a dropped connection.

From the checkout's folder, with hookline running and HOOKLINE_API_KEY set (docs/quickstart.md;
HOOKLINE_URL too if it is not on http://127.0.0.1:8000), and the openai package (``.venv/bin/pip install openai``):

    .venv/bin/python examples/openai_sdk.py
"""

from __future__ import annotations

import os

from openai import OpenAI


def main(model: str = "local") -> str:
    client = OpenAI(
        base_url=os.environ.get("HOOKLINE_URL", "http://127.0.0.1:8000") + "/v1",
        api_key=os.environ["HOOKLINE_API_KEY"],
    )
    parts = []
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=20, stream=True,
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    client.close()
    return "".join(parts)


if __name__ == "__main__":
    main()
