"""What the client hands back: frozen records built from the API's JSON (``raw`` keeps it whole)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

JOB_TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})
JOB_FAILED = frozenset({"failed", "cancelled", "expired"})
BATCH_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One attempt of a job: where it ran (``upstream``, asked for ``model``), how it ended
    (``outcome``: running, retried, succeeded, failed, cancelled, expired) and its ``error``.
    Times are the API's ISO 8601 strings."""

    attempt: int
    upstream: str | None
    model: str | None
    outcome: str
    started_at: str
    ended_at: str | None
    error: dict[str, Any] | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Attempt:
        return cls(
            body["attempt"], body.get("upstream"), body.get("model"), body["outcome"],
            body["started_at"], body.get("ended_at"), body.get("error"),
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Job:
    """A job as the API showed it when it was read. ``attempt_log`` is each attempt, when the
    job was read by itself (``get``, ``wait``); None from a list or a submit."""

    id: str
    status: str
    operation: str
    model: str
    output: dict[str, Any] | None
    error: dict[str, Any] | None
    attempts: int
    metadata: dict[str, str]
    raw: dict[str, Any] = dataclasses.field(repr=False)
    attempt_log: tuple[Attempt, ...] | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Job:
        log = body.get("attempt_log")
        return cls(
            id=body["id"], status=body["status"], operation=body["operation"],
            model=body["model"], output=body.get("output"), error=body.get("error"),
            attempts=body.get("attempts", 0), metadata=body.get("metadata") or {}, raw=dict(body),
            attempt_log=None if log is None else tuple(Attempt.from_json(a) for a in log),
        )  # fmt: skip

    @property
    def done(self) -> bool:
        """Whether the job has ended (succeeded, failed, cancelled or expired)."""
        return self.status in JOB_TERMINAL

    @property
    def text(self) -> str | None:
        """The generated text (first choice) of a finished chat or completion job."""
        for choice in (self.output or {}).get("choices") or []:
            message = choice.get("message")
            text = message.get("content") if message else choice.get("text")
            if text is not None:
                return str(text)
        return None


@dataclasses.dataclass(frozen=True)
class JobPage:
    """One page of the job list; ``next_cursor`` is None on the last."""

    jobs: list[Job]
    next_cursor: str | None
    raw: dict[str, Any] = dataclasses.field(repr=False)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> JobPage:
        jobs = [Job.from_json(job) for job in body["data"]]
        return cls(jobs, body.get("next_cursor"), dict(body))


@dataclasses.dataclass(frozen=True)
class Event:
    """One event of a stream; ``id`` is its resume token. Events of the tenant stream
    (:meth:`Client.events`) also say which job they belong to and when they happened."""

    id: str | None
    type: str
    data: dict[str, Any]
    seq: int | None
    job_id: str | None = None
    created_at: str | None = None

    @classmethod
    def from_json(cls, id: str | None, body: Mapping[str, Any]) -> Event:
        return cls(
            id, body["type"], body.get("data") or {}, body.get("seq"), body.get("job_id"),
            body.get("created_at"),
        )  # fmt: skip

    @property
    def ends_job(self) -> bool:
        """Whether this is the job's terminal event (nothing follows it)."""
        return self.type.removeprefix("job.") in JOB_TERMINAL


@dataclasses.dataclass(frozen=True)
class TextDelta:
    """Output text as the model produced it. A ``job.started`` event with a higher ``attempt``
    means the job started over: text of earlier attempts is superseded."""

    text: str
    index: int
    attempt: int


@dataclasses.dataclass(frozen=True)
class Delivery:
    """A webhook message as the API showed it when it was read: ``pending`` until an attempt
    succeeds (``succeeded``) or its retries run out (``failed``)."""

    id: str
    url: str
    event_type: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: str | None
    raw: dict[str, Any] = dataclasses.field(repr=False)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Delivery:
        return cls(
            id=body["id"], url=body["url"], event_type=body["event_type"], status=body["status"],
            attempts=body.get("attempts", 0), last_status_code=body.get("last_status_code"),
            last_error=body.get("last_error"), next_attempt_at=body.get("next_attempt_at"),
            raw=dict(body),
        )  # fmt: skip

    @property
    def settled(self) -> bool:
        """Whether it was delivered or given up on (no attempt follows)."""
        return self.status != "pending"


@dataclasses.dataclass(frozen=True)
class Batch:
    """A batch as the API showed it when it was read."""

    id: str
    status: str
    total: int
    completed: int
    failed: int
    output_file_id: str | None
    error_file_id: str | None
    errors: list[dict[str, Any]]
    raw: dict[str, Any] = dataclasses.field(repr=False)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Batch:
        counts = body.get("request_counts") or {}
        return cls(
            id=body["id"], status=body["status"], total=counts.get("total", 0),
            completed=counts.get("completed", 0), failed=counts.get("failed", 0),
            output_file_id=body.get("output_file_id"), error_file_id=body.get("error_file_id"),
            errors=(body.get("errors") or {}).get("data") or [], raw=dict(body),
        )  # fmt: skip

    @property
    def done(self) -> bool:
        """Whether the batch has ended (completed, failed, expired or cancelled)."""
        return self.status in BATCH_TERMINAL


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """One line of a batch's results: ``ok`` with the upstream's ``body``, or the ``error``."""

    custom_id: str
    ok: bool
    status_code: int | None
    body: dict[str, Any] | None
    error: dict[str, Any] | None

    @classmethod
    def from_json(cls, line: Mapping[str, Any]) -> BatchResult:
        response = line.get("response") or {}
        status = response.get("status_code")
        ok = status is not None and 200 <= status < 300
        return cls(line["custom_id"], ok, status, response.get("body"), line.get("error"))
