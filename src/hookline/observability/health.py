"""Health checks: each dependency reports its own, ``/readyz`` runs them together and says which
is failing.

A check is a coroutine giving a :class:`Check`. A *required* one failing makes the process not
ready (``503``): the database and its schema, without which nothing can be accepted. The others
are reported but keep the process in its load balancer: an upstream that fails does not stop
jobs from being accepted (they wait and are retried), and the wake-ups between processes only
make things faster (polling remains).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

Status = Literal["ok", "failing", "unknown"]
# Consecutive failures of an upstream's calls (5xx, 429, timeouts, broken answers) before it is
# reported failing; a success resets the count.
FAILING_AFTER = 3


@dataclasses.dataclass(frozen=True)
class Check:
    status: Status
    required: bool = True
    detail: str | None = None
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def failing(self) -> bool:
        return self.status == "failing"

    def as_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"status": self.status, "required": self.required}
        if self.detail is not None:
            found["detail"] = self.detail
        found.update(self.info)
        return found


HealthCheck = Callable[[], Awaitable[Check]]


async def run_checks(checks: Mapping[str, HealthCheck], timeout: float = 3.0) -> dict[str, Check]:
    """Every check at once, each given ``timeout`` seconds; one that raises or takes longer is
    failing (a required one stays required)."""

    async def run(check: HealthCheck) -> Check:
        try:
            async with asyncio.timeout(timeout):
                return await check()
        except TimeoutError:
            return Check("failing", detail=f"no answer within {timeout:g} s")
        except Exception as exc:
            return Check("failing", detail=f"{type(exc).__name__}: {exc}")

    results = await asyncio.gather(*(run(check) for check in checks.values()))
    return dict(zip(checks, results, strict=True))


class UpstreamHealth:
    """What this process's calls to one upstream saw lately (fed by every call's end)."""

    __slots__ = ("calls", "failures", "last_error", "last_failure_at", "last_success_at")

    def __init__(self) -> None:
        self.calls = 0
        self.failures = 0  # in a row, since the last success
        self.last_success_at: float | None = None
        self.last_failure_at: float | None = None
        self.last_error: str | None = None

    def record(self, status: str) -> None:
        """A call ended with ``status``: ``ok``, an HTTP status, or an error's type."""
        if status == "ok":
            self.calls += 1
            self.failures = 0
            self.last_success_at = time.time()
        elif _upstream_at_fault(status):
            self.calls += 1
            self.failures += 1
            self.last_failure_at = time.time()
            self.last_error = status

    def check(self, circuit: str | None = None) -> Check:
        """Healthy or not: by the upstream's circuit breaker (``circuit``: ``closed``,
        ``open``, ``half_open``) where it has one, else by the failures in a row seen here."""
        info: dict[str, Any] = {"consecutive_failures": self.failures}
        if circuit is not None:
            info["circuit"] = circuit
        if self.last_success_at is not None:
            info["last_success_at"] = _iso(self.last_success_at)
        if self.last_error is not None:
            info["last_error"] = self.last_error
            info["last_failure_at"] = _iso(self.last_failure_at)
        if circuit == "open":
            detail = "its circuit is open: calls wait (or fall back to another upstream)"
            return Check("failing", required=False, detail=detail, info=info)
        if circuit == "half_open":
            detail = "its circuit is half-open: a trial call decides"
            return Check("failing", required=False, detail=detail, info=info)
        if circuit is None and self.failures >= FAILING_AFTER:
            detail = f"the last {self.failures} calls failed ({self.last_error})"
            return Check("failing", required=False, detail=detail, info=info)
        if circuit is None and not self.calls:
            return Check("unknown", required=False, detail="no call yet", info=info)
        return Check("ok", required=False, info=info)


def _upstream_at_fault(status: str) -> bool:
    """Whether a call's failure says something of the upstream's health: a 4xx (but 429) is the
    request's fault; a cancelled call or our own error says nothing."""
    if status.isdigit():
        code = int(status)
        return code >= 500 or code == 429
    return status not in ("cancelled", "internal_error", "output_too_large", "upstream_unknown")


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))
