"""A small SSE client for the tests: reads a stream into messages, optionally stopping early."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import httpx


@dataclasses.dataclass
class SSE:
    id: str | None
    event: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


@dataclasses.dataclass
class Stream:
    status: int
    headers: httpx.Headers
    messages: list[SSE]
    comments: list[str]
    body: bytes = b""  # when the answer was not a stream


async def read_sse(
    client: httpx.AsyncClient,
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    json_body: Any = None,
    limit: int | None = None,
    until_comments: int | None = None,
) -> Stream:
    """Read ``url`` as SSE until it ends, or after ``limit`` messages (then disconnect)."""
    messages: list[SSE] = []
    comments: list[str] = []
    request_headers = {"Accept": "text/event-stream", **(headers or {})}
    async with client.stream(
        method, url, headers=request_headers, params=params, json=json_body
    ) as response:
        if response.headers.get("content-type", "").split(";")[0] != "text/event-stream":
            return Stream(response.status_code, response.headers, [], [], await response.aread())
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line == "":
                if fields:
                    messages.append(
                        SSE(fields.get("id"), fields.get("event"), fields.get("data", ""))
                    )
                    fields = {}
                    if limit is not None and len(messages) >= limit:
                        break
                continue
            if line.startswith(":"):
                comments.append(line[1:].strip())
                if until_comments is not None and len(comments) >= until_comments:
                    break
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            fields[name] = (
                f"{fields[name]}\n{value}" if name == "data" and name in fields else value
            )
        return Stream(response.status_code, response.headers, messages, comments)
