"""The FastAPI application: routes, problem+json handlers, the key check and the body limits,
health endpoints."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from hookline._version import __version__
from hookline.api import (
    anthropic_compat,
    asyncapi,
    batches,
    dashboard,
    health,
    inbound,
    jobs,
    metrics,
    openai_compat,
    openapi,
    responses,
    sinks,
    streams,
    upstreams,
    usage,
    webhooks,
)
from hookline.api.deps import AuthMiddleware
from hookline.api.keys import router as keys_router
from hookline.api.limits import BodyLimitMiddleware
from hookline.api.problems import install_problem_handlers
from hookline.gateway import Gateway


def create_app(gateway: Gateway, *, manage_gateway: bool = True) -> FastAPI:
    """The ASGI app serving ``gateway``. With ``manage_gateway`` the app starts and stops it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_gateway:
            await gateway.start()
        try:
            yield
        finally:
            if manage_gateway:
                await gateway.stop()

    app = FastAPI(
        title="hookline",
        version=__version__,
        summary="Asynchronous AI gateway: durable GenAI jobs, delivered your way.",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    install_problem_handlers(app)
    openapi.install(app)
    # The routes join the app's own router: FastAPI's include_router keeps a lazily resolved
    # sub-router that it walks on every request, which cost 13% of the accept path's CPU.
    app.router.routes.extend(jobs.router.routes)
    app.router.routes.extend(streams.router.routes)
    app.router.routes.extend(openai_compat.router.routes)
    app.router.routes.extend(anthropic_compat.router.routes)
    app.router.routes.extend(responses.router.routes)
    app.router.routes.extend(webhooks.router.routes)
    app.router.routes.extend(sinks.router.routes)
    app.router.routes.extend(batches.router.routes)
    app.router.routes.extend(inbound.router.routes)
    app.router.routes.extend(usage.router.routes)
    app.router.routes.extend(keys_router.routes)
    app.router.routes.extend(upstreams.router.routes)
    app.router.routes.extend(health.router.routes)
    app.router.routes.extend(asyncapi.router.routes)
    if gateway.settings.dashboard.enabled:
        dashboard.install(app)
    if gateway.settings.metrics.enabled:
        app.router.routes.extend(metrics.router.routes)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=gateway.settings.jobs.max_body_bytes,
        upload_paths=("/v1/files", "/v1/batches"),
        # The file's limit is checked as it streams in; this leaves room for multipart framing.
        upload_max_bytes=gateway.settings.batches.max_bytes + 1024 * 1024,
    )
    app.add_middleware(AuthMiddleware, gateway=gateway)  # the outer one: the key comes first
    app.add_middleware(gateway.telemetry.tracing.middleware)  # a span per request, when on

    return app
