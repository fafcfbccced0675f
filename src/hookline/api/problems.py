"""RFC 9457 problem+json: every error response is built here."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from hookline.errors import (
    Conflict,
    HooklineError,
    InvalidRequest,
    LimitReached,
    NotFound,
    StoreFull,
    StoreUnavailable,
    TooLarge,
    Unauthorized,
)

PROBLEM_MEDIA_TYPE = "application/problem+json"

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response serialised with orjson (the routes skip FastAPI's response validation)."""
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


def problem(
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    headers: dict[str, str] | None = None,
    openai: bool = False,
    **extensions: Any,
) -> Response:
    """A problem+json response; with ``openai``, it also carries OpenAI's ``error`` object, which
    the OpenAI SDKs read their message from (the facade's routes answer this way)."""
    kind = slug or _TITLES.get(status, "error").lower().replace(" ", "-")
    body = {
        "type": f"urn:hookline:problem:{kind}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        **extensions,
    }
    if openai:
        body["error"] = {"message": detail, "type": kind, "param": None, "code": kind}
    return Response(
        orjson.dumps(body), status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )


log = logging.getLogger("hookline.api")


class RequestProblem(HooklineError):
    """A request refused before it is understood (a body that is not JSON, or past the JSON
    limits; a cursor the API did not make): the status and problem type are the raiser's."""

    def __init__(self, status: int, detail: str, *, slug: str) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug


_ERROR_STATUS: list[tuple[type[HooklineError], int, str]] = [
    (NotFound, 404, "not-found"),
    (Conflict, 409, "conflict"),
    (TooLarge, 413, "too-large"),
    (InvalidRequest, 422, "invalid-request"),
    (Unauthorized, 401, "unauthorized"),
    (StoreFull, 503, "storage-full"),
    (StoreUnavailable, 503, "database-unavailable"),
]


# The steps pydantic adds to an error's location inside a union or a validator chain
# ("str-enum[JobOperation]", "constrained-str", "function-after[...]"): not the caller's fields.
# Each carries its bracketed argument but the bare constrained-*: a field named "union" or
# "default" stays in the location.
_VALIDATOR_STEP = re.compile(
    r"(function-(after|before|wrap|plain)|(str|int)-enum|enum|union|tagged-union|chain|nullable"
    r"|lax-or-strict|json-or-python|default|is-instance|literal|model|dataclass)\[.*\]"
    r"|constrained-[a-z]+"
)


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(
        str(part) for part in loc if not (isinstance(part, str) and _VALIDATOR_STEP.fullmatch(part))
    )


def _message(error: Any) -> str:
    """Pydantic's message, without the "Value error, " it puts before a validator's own words."""
    message = str(error["msg"])
    return message.removeprefix("Value error, ") if error.get("type") == "value_error" else message


async def _validation_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        message = next(
            e.get("ctx", {}).get("error", "") for e in errors if e["type"] == "json_invalid"
        )
        return problem(400, f"the request body is not valid JSON: {message}", slug="malformed-json")
    content_type = request.headers.get("content-type", "")
    if any(e["loc"] == ("body",) and e["type"] == "missing" for e in errors) and (
        "json" in content_type
    ):  # an empty body is no more JSON than a malformed one
        return problem(400, "the request body is empty: send a JSON object", slug="malformed-json")
    if any(e["loc"] == ("body",) for e in errors) and "json" not in content_type:
        return problem(
            415,
            f"the request body must be JSON: send 'Content-Type: application/json' (got {content_type or 'none'!r})",
            slug="unsupported-media-type",
        )
    details = [{"location": _location(e["loc"]), "message": _message(e)} for e in errors]
    summary = "; ".join(f"{d['location']}: {d['message']}" for d in details[:5])
    return problem(422, summary, slug="validation-error", errors=details)


async def _http_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # Starlette names the methods of the first route on the path only
        headers["Allow"] = ", ".join(allowed_methods(request))
    return problem(exc.status_code, detail, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method the request's path takes, across the routes that match it."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "OPTIONS"})
        if match is not Match.NONE:  # PARTIAL: the path matches, the method does not
            methods |= getattr(route, "methods", None) or set()
    order = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))


# The OpenAI-compatible routes: their errors also carry OpenAI's error object.
OPENAI_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/responses",
        "/v1/images/generations",
    }
)


def error_response(exc: HooklineError, request: str, *, openai: bool = False) -> Response:
    """The problem+json answer to ``request`` (its method and path, for the log) for one of our
    errors; with ``openai``, it also carries OpenAI's error object."""
    try:
        detail = str(exc)
    except Exception:  # a message that cannot be built must not turn into a bare 500
        detail = type(exc).__name__
    if isinstance(exc, RequestProblem):
        return problem(exc.status, detail, slug=exc.slug, openai=openai)
    if isinstance(exc, LimitReached):  # hookline.fairness: the caller may try again later
        headers = None
        if exc.retry_after is not None:
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        return problem(exc.status, detail, slug=exc.kind, headers=headers, openai=openai)
    for error_type, status, slug in _ERROR_STATUS:
        if isinstance(exc, error_type):
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            if status == 503:
                headers = {"Retry-After": "1"}
            return problem(status, detail, slug=slug, headers=headers, openai=openai)
    log.error("%s failed: %s", request, detail)
    return problem(500, "internal error", slug="internal-error", openai=openai)


async def _hookline_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HooklineError)
    path = request.url.path
    return error_response(exc, f"{request.method} {path}", openai=path in OPENAI_PATHS)


async def _recursion_handler(request: Request, exc: Exception) -> Response:
    # The body's limits (hookline.api.limits) keep nesting far below Python's recursion limit, so
    # this is a second line: what nests too deep is the caller's value, not a server error.
    # (Serialization errors cannot be told apart from bugs here: orjson's is TypeError itself.)
    log.warning("%s %s: RecursionError", request.method, request.url.path)
    return problem(
        422,
        "the request holds a value nested too deep to handle",
        slug="too-deep",
        openai=request.url.path in OPENAI_PATHS,
    )


async def _unexpected_handler(request: Request, exc: Exception) -> Response:
    return problem(
        500,
        "internal error; the server log has the details",
        slug="internal-error",
        openai=request.url.path in OPENAI_PATHS,
    )


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(HooklineError, _hookline_handler)
    app.add_exception_handler(RecursionError, _recursion_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
