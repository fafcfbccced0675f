"""Reading an OpenAI-style SSE stream of chunks a read (whatever bytes have arrived) at a time:
the chunks of one read are parsed together, as one JSON array (one call instead of one per chunk:
147 µs instead of 264 for a read of 200 chunks).

Bytes that are not an event stream (garbage from a broken upstream or proxy) raise
:func:`~hookline.upstreams.base.bad_response` as soon as a line shows it, even one still arriving:
a line must be blank, a comment, or a field whose name is a short token (``data``, ``event``, …;
other names are ignored, as the SSE spec says), and every ``data`` payload one JSON value.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from hookline.upstreams.base import bad_response

_NAME_MAX = 64  # longest field name taken (the spec's are 2-5 letters)
_FIELD_NAME = re.compile(rb"[A-Za-z0-9_.-]*")
_BOM = b"\xef\xbb\xbf"


class ChunkStreamParser:
    """Turns the bytes of one SSE stream into its chunks, in order."""

    def __init__(self) -> None:
        # The pieces of the line still arriving (a list: a long line arriving in many reads is
        # joined once, not copied again with every read).
        self._partial: list[bytes] = []
        self.done = False  # [DONE] came, or an error chunk
        # The error chunk that ended the stream; the chunks before it are returned as usual.
        self.error: Any = None

    def feed(self, data: bytes) -> list[Any]:
        """The chunks completed by ``data`` (with the unfinished line before it)."""
        if data.find(b"\n") < 0:
            self._partial.append(data)
            self._check_partial()
            return []
        if self._partial:
            data = b"".join((*self._partial, data))
            self._partial.clear()
        lines = data.split(b"\n")
        tail = lines.pop()  # the start of a line still arriving
        if tail:
            self._partial.append(tail)
            self._check_partial()
        return self._parse(lines)

    def end(self) -> list[Any]:
        """The chunk of a last line that had no newline."""
        tail = b"".join(self._partial)
        self._partial.clear()
        return self._parse([tail]) if tail and not self.done else []

    def _check_partial(self) -> None:
        head = self._partial[0]
        if len(head) <= _NAME_MAX and len(self._partial) > 1:
            head = b"".join(self._partial)
        _check_field(head[: _NAME_MAX + 1])

    def _parse(self, lines: list[bytes]) -> list[Any]:
        payloads: list[bytes] = []
        for raw in lines:
            if raw.startswith(b"data: {"):  # the common line (a trailing CR is JSON whitespace)
                payloads.append(raw[6:])
                continue
            if not raw:
                continue  # the blank line after each event
            line = raw if raw.startswith(b"data:") else raw.strip().removeprefix(_BOM).strip()
            if not line.startswith(b"data:"):
                _check_field(line)
                continue  # comments, event names
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                break
            payloads.append(payload)
        if not payloads:
            return []
        joined = b",".join(payloads)
        try:
            chunks: list[Any] = orjson.loads(b"[%b]" % joined)
            if len(chunks) != len(payloads):  # a payload that is not one JSON value: say which
                chunks = [orjson.loads(payload) for payload in payloads]
        except orjson.JSONDecodeError as exc:
            raise bad_response(f"a data line of its event stream is not JSON: {exc}") from exc
        if b'"error"' in joined:  # rare: an error chunk ends the stream
            for number, chunk in enumerate(chunks):
                if isinstance(chunk, dict) and chunk.get("error"):
                    self.done, self.error = True, chunk
                    return chunks[:number]
        return chunks


def _check_field(line: bytes) -> None:
    """Raise unless ``line`` (or the start of one) is a comment or a field with a plausible name."""
    line = line.strip().removeprefix(_BOM)
    if line.startswith(b":"):
        return  # a comment
    name = line.partition(b":")[0]
    if len(name) > _NAME_MAX or not _FIELD_NAME.fullmatch(name):
        raise bad_response(f"it sent a line that is not an event stream's: {line[:40]!r}")
