"""Stream a job's output as it is produced; a dropped connection is resumed where it stopped,
and the text printed is exactly the output, never a token lost or repeated.

From the checkout's folder, with hookline running and HOOKLINE_API_KEY set (docs/quickstart.md;
HOOKLINE_URL too if it is not on http://127.0.0.1:8000):

    .venv/bin/python examples/stream_with_resume.py
"""

from __future__ import annotations

from hookline.client import Client, Event, TextDelta


def main(model: str = "local", prompt: str = "Tell me a short story.") -> str:
    text = []
    with Client() as client:
        job = client.submit(
            "chat.completions",
            {"messages": [{"role": "user", "content": prompt}], "max_tokens": 60},
            model=model,
        )
        for item in client.stream(job):  # reconnects with Last-Event-ID by itself
            if isinstance(item, TextDelta):
                print(item.text, end="", flush=True)
                text.append(item.text)
            elif isinstance(item, Event) and item.type == "job.started" and text:
                text.clear()  # the job started over (a retry): its new text replaces the old
                print("\n[retrying]")
    print()
    return "".join(text)


if __name__ == "__main__":
    main()
