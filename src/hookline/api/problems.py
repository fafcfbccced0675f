"""RFC 9457 problem+json: every error response is built here."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from hookline.errors import (
    Conflict,
    HooklineError,
    InvalidRequest,
    NotFound,
    StoreUnavailable,
    TooLarge,
    Unauthorized,
)

PROBLEM_MEDIA_TYPE = "application/problem+json"

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
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

_ERROR_STATUS: list[tuple[type[HooklineError], int, str]] = [
    (NotFound, 404, "not-found"),
    (Conflict, 409, "conflict"),
    (TooLarge, 413, "too-large"),
    (InvalidRequest, 422, "invalid-request"),
    (Unauthorized, 401, "unauthorized"),
    (StoreUnavailable, 503, "database-unavailable"),
]


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


async def _validation_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        message = next(
            e.get("ctx", {}).get("error", "") for e in errors if e["type"] == "json_invalid"
        )
        return problem(400, f"the request body is not valid JSON: {message}", slug="malformed-json")
    content_type = request.headers.get("content-type", "")
    if any(e["loc"] == ("body",) for e in errors) and "json" not in content_type:
        return problem(
            415,
            f"the request body must be JSON: send 'Content-Type: application/json' (got {content_type or 'none'!r})",
            slug="unsupported-media-type",
        )
    details = [{"location": _location(e["loc"]), "message": e["msg"]} for e in errors]
    summary = "; ".join(f"{d['location']}: {d['message']}" for d in details[:5])
    return problem(422, summary, slug="validation-error", errors=details)


async def _http_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return problem(exc.status_code, detail, headers=dict(exc.headers or {}))


# The OpenAI-compatible routes: their errors also carry OpenAI's error object.
OPENAI_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"}
)


async def _hookline_handler(request: Request, exc: Exception) -> Response:
    openai = request.url.path in OPENAI_PATHS
    for error_type, status, slug in _ERROR_STATUS:
        if isinstance(exc, error_type):
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            if status == 503:
                headers = {"Retry-After": "1"}
            return problem(status, str(exc), slug=slug, headers=headers, openai=openai)
    log.error("%s %s failed: %s", request.method, request.url.path, exc)
    return problem(500, "internal error", slug="internal-error", openai=openai)


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
    app.add_exception_handler(Exception, _unexpected_handler)
