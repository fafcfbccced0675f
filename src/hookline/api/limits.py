"""A pure-ASGI request body limit: 413 before the body is read when Content-Length is too large,
and as soon as a chunked body passes the limit otherwise (the app then sees a disconnect, and
whatever it answers is replaced by the 413)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hookline.api.problems import problem


class BodyLimitMiddleware:
    """``max_bytes`` for every request, but ``upload_max_bytes`` for uploads (paths starting with
    one of ``upload_paths``: batch input files, which the routes stream to the store)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        *,
        upload_paths: tuple[str, ...] = (),
        upload_max_bytes: int = 0,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_paths = upload_paths
        self.upload_max_bytes = upload_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        if self.upload_paths and scope["path"].startswith(self.upload_paths):
            limit = max(limit, self.upload_max_bytes)
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._reject(scope, receive, send, limit)
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

    async def _reject(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = problem(
            413,
            f"the request body is larger than the limit of {limit} bytes",
            slug="body-too-large",
        )
        await response(scope, receive, send)
