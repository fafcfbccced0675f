"""The request's limits, in one pure-ASGI middleware that runs before any route parses:

- the URL: a 400 problem for a NUL character in the path or the query (no database keeps one in
  text, and no id or parameter of ours holds one);

- size: 413 before the body is read when Content-Length is too large, and as soon as a chunked
  body passes the limit otherwise (the app then sees a disconnect, and whatever it answers is
  replaced by the 413);
- JSON: a body the routes would read as JSON is parsed here, once, by :func:`parse_json`, and a
  400 problem answers one that is not JSON or is beyond :mod:`hookline.jsonlimits` (nested
  deeper than 64 levels, an integer past 64 bits, NaN, a lone surrogate, a NUL character): what
  gets through can be stored, served and sent back as it came. The parsed value is kept in the
  request's scope for :func:`json_body`, and FastAPI's own parse of it cannot fail.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hookline.api.problems import OPENAI_PATHS, RequestProblem, error_response, problem
from hookline.jsonlimits import MAX_DEPTH, unfit

_SCOPE_KEY = "hookline.json"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def parse_json(raw: bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value of ``raw``, or :class:`RequestProblem` (400) when it is not JSON or is
    beyond what :mod:`hookline.jsonlimits` lets in."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:  # also NaN, 1e400, lone surrogates, depth > 1024
        raise RequestProblem(
            400, f"the request body is not valid JSON: {exc}", slug="malformed-json"
        ) from exc
    refusal = unfit(raw, value, max_depth=max_depth)
    if refusal is not None:
        code, message = refusal
        raise RequestProblem(400, f"the request body: {message}", slug=code.replace("_", "-"))
    return value


def is_json(content_type: str | None) -> bool:
    """Whether a body of this type is read as JSON: ``application/json`` or ``application/*+json``
    (FastAPI's rule; a body without a type is not)."""
    if not content_type:
        return False
    media_type = content_type.partition(";")[0].strip().lower()
    main, _, sub = media_type.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


async def json_body(request: Request) -> Any:
    """The request's JSON body as :class:`BodyLimitMiddleware` parsed and checked it; a 415
    problem when it is not declared JSON."""
    if _SCOPE_KEY in request.scope:
        return request.scope[_SCOPE_KEY]
    content_type = request.headers.get("content-type")
    if not is_json(content_type):
        raise RequestProblem(
            415,
            f"the request body must be JSON: send 'Content-Type: application/json' (got {content_type or 'none'!r})",
            slug="unsupported-media-type",
        )
    return parse_json(await request.body())  # an app built without the middleware


class BodyLimitMiddleware:
    """``max_bytes`` for every request, but ``upload_max_bytes`` for uploads (paths starting with
    one of ``upload_paths``: batch input files, which the routes stream to the store); JSON bodies
    within ``max_json_depth``."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        *,
        upload_paths: tuple[str, ...] = (),
        upload_max_bytes: int = 0,
        max_json_depth: int = MAX_DEPTH,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_paths = upload_paths
        self.upload_max_bytes = upload_max_bytes
        self.max_json_depth = max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope["query_string"]:
            await self._refuse_nul(scope, receive, send)
            return
        limit = self.max_bytes
        if self.upload_paths and scope["path"].startswith(self.upload_paths):
            limit = max(limit, self.upload_max_bytes)
        content_type = None
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._reject(scope, receive, send, limit)
                return
            if name == b"content-type":
                content_type = value.decode("latin-1")
        if scope["method"] in _BODY_METHODS and is_json(content_type):
            await self._json_request(scope, receive, send, limit)
            return
        received = 0
        too_large = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not too_large:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large:
            await self._reject(scope, receive, send, limit)

    async def _json_request(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Read the whole body, check it, and hand the app the parsed value with the body."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before it finished sending
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._reject(scope, receive, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body:  # an empty body is the route's to refuse ("field required")
            try:
                scope[_SCOPE_KEY] = parse_json(body, max_depth=self.max_json_depth)
            except RequestProblem as exc:
                where = f"{scope['method']} {scope['path']}"
                response = error_response(exc, where, openai=scope["path"] in OPENAI_PATHS)
                await response(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # the disconnect, for responses that watch for it

        await self.app(scope, replay, send)

    async def _refuse_nul(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem(
            400,
            "the URL holds a NUL character (%00)",
            slug="invalid-character",
            openai=scope["path"] in OPENAI_PATHS,
        )
        await response(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = problem(
            413,
            f"the request body is larger than the limit of {limit} bytes",
            slug="body-too-large",
            openai=scope["path"] in OPENAI_PATHS,
        )
        await response(scope, receive, send)
