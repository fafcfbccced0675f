"""What the server commands print: log records in one format, with every credential taken out."""

from __future__ import annotations

import logging
import re

from hookline.observability.logs import TEXT_FORMAT, LogFormat, use_format

# Query parameters that carry a credential: the WebSocket login's access_token (docs/streams.md)
# and the names other clients give the same thing. And our API keys, wherever they show.
_SECRET_PARAMETER = re.compile(
    r"(?i)([?&;](?:access_token|token|api_key|apikey|key|secret|password|signature|sig)=)[^&;\s\"'#]*"
)
_API_KEY = re.compile(r"\bhk_[A-Za-z0-9]{8,}")
_TRACEBACKS = logging.Formatter()


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Log records at ``level`` and above to stderr, one line each (text, or a JSON object),
    credentials redacted."""
    logging.basicConfig(level=level.upper(), format=TEXT_FORMAT)
    use_format(log_format, [None])
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines are noise at start
    redact_logs(log_format)


def redact(text: str) -> str:
    """``text`` with the credentials in it replaced by ``[redacted]``."""
    if "=" in text:
        text = _SECRET_PARAMETER.sub(r"\1[redacted]", text)
    if "hk_" in text:
        text = _API_KEY.sub("hk_[redacted]", text)
    return text


class RedactSecrets(logging.Filter):
    """Takes the credentials out of a record before it is printed: uvicorn logs a WebSocket's
    path with its query, the documented ``?access_token=hk_…`` login included, and its access log
    does the same for every request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        if record.name != "uvicorn.access":  # (its formatter takes the arguments apart)
            message = record.getMessage()  # an argument that is not a string: an exception, …
            redacted = redact(message)
            if redacted != message:
                record.msg, record.args = redacted, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(_TRACEBACKS.formatException(record.exc_info))
        return True


def redact_logs(log_format: LogFormat = "text") -> None:
    """Pass every record printed so far configured through :class:`RedactSecrets`: the root's
    handlers and uvicorn's (which uvicorn.Config replaces: call this again after making one).
    With ``json``, uvicorn's lines are JSON objects too."""
    redaction = RedactSecrets()
    if log_format == "json":
        use_format("json", ["uvicorn", "uvicorn.error", "uvicorn.access"])
    for name in (None, "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        for filtered in (logger, *logger.handlers):
            if not any(isinstance(f, RedactSecrets) for f in filtered.filters):
                filtered.addFilter(redaction)
