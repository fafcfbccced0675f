"""Structured logs: one line per event that matters, as text or JSON (``--log-format json``).

The events are logged here, from the same hooks as the metrics (:class:`Telemetry`): a job that
ended (``info``), an attempt that will be tried again and a message given up on (``warning``), a
job accepted and each delivery attempt (``debug``). Each carries the fields an operator filters
on — ``job_id``, ``tenant``, ``upstream``, ``attempt`` and the like — as attributes of the record:
top-level keys in JSON, ``key=value`` after the message in text. A record logged while a job runs
in the worker carries that job's fields too (:func:`bind`, a context variable of the job's task).

Nothing secret is ever among the fields: no input, output, key, secret or header. The command
line's redaction (``hookline.cli.logs``) runs on every record before it is formatted.
"""

from __future__ import annotations

import contextvars
import datetime
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Protocol

import orjson

jobs_log = logging.getLogger("hookline.jobs")
deliveries_log = logging.getLogger("hookline.deliveries")

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The fields a record may carry, in the order they are shown.
FIELDS = ("job_id", "tenant", "upstream", "operation", "model", "attempt", "status", "error",
          "delivery_id", "endpoint_id", "event_type", "status_code", "duration_ms")  # fmt: skip
_bound: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "hookline_log_fields", default=None
)


class LoggedJob(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def upstream(self) -> str: ...
    @property
    def operation(self) -> str: ...
    @property
    def attempts(self) -> int: ...


def bind(**fields: Any) -> None:
    """Give every record logged from now on in this task (and the tasks it starts) ``fields``."""
    _bound.set(fields)


def job_fields(job: LoggedJob) -> dict[str, Any]:
    return {"job_id": job.id, "tenant": job.tenant, "upstream": job.upstream,
            "operation": str(job.operation), "attempt": job.attempts}  # fmt: skip


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record: those bound to the task logging it (formatting runs
    in the logging call), then its own."""
    found = dict(_bound.get() or {})
    for key in FIELDS:
        value = record.__dict__.get(key)
        if value is not None:
            found[key] = value
    return found


class TextFormatter(logging.Formatter):
    """The classic line, then the record's fields as ``key=value``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = fields_of(record)
        if not fields:
            return line
        pairs = " ".join(f"{k}={_text(v)}" for k, v in _ordered(fields))
        head, newline, rest = line.partition("\n")  # a traceback stays below
        return f"{head} {pairs}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ms), ``level``, ``logger``, ``message``, the
    record's fields, and ``exception`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        line: dict[str, Any] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_ordered(fields_of(record)))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        return orjson.dumps(line, default=str).decode()


def formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def use_format(log_format: LogFormat, loggers: Iterable[str | None]) -> None:
    """Format what the handlers of ``loggers`` print as ``log_format``."""
    chosen = formatter(log_format)
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(chosen)


def _ordered(fields: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return sorted(fields.items(), key=lambda item: FIELDS.index(item[0]))


def _text(value: Any) -> str:
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


# --- the events


def job_accepted(job: LoggedJob) -> None:
    if jobs_log.isEnabledFor(logging.DEBUG):
        jobs_log.debug("job accepted", extra=job_fields(job))


def job_ended(
    job: LoggedJob, status: str, error: Mapping[str, Any] | None, ran_ms: int | None
) -> None:
    if not jobs_log.isEnabledFor(logging.INFO):
        return
    fields = job_fields(job)
    fields.update(status=status, duration_ms=ran_ms)
    if error and status == "failed":
        fields["error"] = error.get("type")
        jobs_log.info("job failed: %.300s", error.get("message", ""), extra=fields)
    else:
        jobs_log.info("job %s", status, extra=fields)


def job_retrying(job: LoggedJob, reason: str, delay: float) -> None:
    if jobs_log.isEnabledFor(logging.WARNING):
        fields = {**job_fields(job), "error": reason}
        jobs_log.warning("attempt failed; retrying in %.1f s", delay, extra=fields)


def delivery_attempted(
    kind: str, facts: Mapping[str, Any], status_code: int | None, outcome: str | None
) -> None:
    """``facts``: the message's ``delivery_id``, ``tenant``, ``job_id``, ``endpoint_id``,
    ``event_type``, ``attempt``. ``outcome``: ``delivered``, ``dead``, or None (retried)."""
    level = logging.WARNING if outcome == "dead" else logging.DEBUG
    if deliveries_log.isEnabledFor(level):
        what = {"dead": "given up on (a dead letter)", "delivered": "delivered"}.get(
            outcome or "", "failed; it will be retried"
        )
        deliveries_log.log(level, "%s message %s", kind, what,
                           extra={**facts, "status_code": status_code})  # fmt: skip
