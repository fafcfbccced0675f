"""The upstream interface and its error type (the implementations are found through
:mod:`hookline.upstreams.registry`)."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from typing import Any

from hookline.config import UpstreamConfig
from hookline.jobs import Operation

# Called with (choice index, text) for each piece of streamed output.
DeltaSink = Callable[[int, str], None]
# Handed a function that gives the output so far (text, tool calls, usage as far as they came):
# what an attempt cut short keeps.
PartialSink = Callable[[Callable[[], dict[str, Any]]], None]

# 529: "overloaded" (Anthropic, and some proxies).
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


class UpstreamError(Exception):
    """An attempt failed. ``retryable`` says whether trying again may help."""

    def __init__(
        self,
        type: str,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.body = body

    @classmethod
    def from_status(cls, status: int, body: Any, retry_after: float | None = None) -> UpstreamError:
        message = _error_message(body) or f"upstream answered HTTP {status}"
        return cls(
            "upstream_error",
            message,
            status=status,
            retryable=status in RETRYABLE_STATUSES,
            retry_after=retry_after,
            body=body,
        )


def bad_response(detail: str) -> UpstreamError:
    """The upstream's answer is not what its protocol allows (garbage, a broken proxy): retried,
    as a flaky server or proxy may answer properly next time."""
    return UpstreamError(
        "upstream_bad_response", f"the upstream's answer is not valid: {detail}", retryable=True
    )


def output_too_large(limit: int) -> UpstreamError:
    """The answer passed the upstream's ``max_output_bytes``: not retried, as the same request
    would most likely run past it again."""
    return UpstreamError(
        "output_too_large",
        f"the upstream's answer passed the limit of {limit} bytes (max_output_bytes)",
    )


def _error_message(body: Any) -> str | None:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return None


class Upstream(abc.ABC):
    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.name = config.name

    async def start(self) -> None:  # noqa: B027 (optional hook)
        """Acquire what the upstream needs (connections, a loaded model)."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release it again."""

    @abc.abstractmethod
    async def run(
        self,
        operation: Operation,
        body: dict[str, Any],
        on_delta: DeltaSink,
        *,
        held_until: asyncio.Future[Any] | None = None,
        partial: PartialSink | None = None,
    ) -> dict[str, Any]:
        """Perform one attempt and return the output as the OpenAI API shapes it.

        ``partial``: an upstream that assembles its output as it streams hands it a function
        giving the output so far, for an attempt cancelled before its end.

        ``held_until``: while this future is pending nobody can see the text (the job's accept is
        still committing), so an upstream that reads bursts may take only the start of the answer
        until then; the rest would only compete with that commit for the event loop.

        Raises :class:`UpstreamError`. Cancelling the calling task aborts the upstream call.
        """
