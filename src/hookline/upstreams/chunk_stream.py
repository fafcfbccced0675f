"""Reading an OpenAI-style SSE stream of chunks a read (whatever bytes have arrived) at a time:
the chunks of one read are parsed together, as one JSON array (one call instead of one per chunk:
147 µs instead of 264 for a read of 200 chunks)."""

from __future__ import annotations

from typing import Any

import orjson


class ChunkStreamParser:
    """Turns the bytes of one SSE stream into its chunks, in order."""

    def __init__(self) -> None:
        self._tail = b""
        self.done = False  # [DONE] came, or an error chunk
        # The error chunk that ended the stream; the chunks before it are returned as usual.
        self.error: Any = None

    def feed(self, data: bytes) -> list[Any]:
        """The chunks completed by ``data`` (with the unfinished line before it)."""
        lines = (self._tail + data if self._tail else data).split(b"\n")
        self._tail = lines.pop()  # the start of a line still arriving
        return self._parse(lines)

    def end(self) -> list[Any]:
        """The chunk of a last line that had no newline."""
        tail, self._tail = self._tail, b""
        return self._parse([tail]) if tail and not self.done else []

    def _parse(self, lines: list[bytes]) -> list[Any]:
        payloads: list[bytes] = []
        for raw in lines:
            if raw.startswith(b"data: {"):  # the common line (a trailing CR is JSON whitespace)
                payloads.append(raw[6:])
                continue
            if not raw:
                continue  # the blank line after each event
            line = raw if raw.startswith(b"data:") else raw.strip()
            if not line.startswith(b"data:"):
                continue  # comments, event names
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                break
            payloads.append(payload)
        if not payloads:
            return []
        joined = b",".join(payloads)
        chunks: list[Any] = orjson.loads(b"[%b]" % joined)
        if len(chunks) != len(payloads):  # a payload that is not one JSON value: say which
            chunks = [orjson.loads(payload) for payload in payloads]
        if b'"error"' in joined:  # rare: an error chunk ends the stream
            for number, chunk in enumerate(chunks):
                if isinstance(chunk, dict) and chunk.get("error"):
                    self.done, self.error = True, chunk
                    return chunks[:number]
        return chunks
