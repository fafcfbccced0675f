"""The dashboard's pages and actions. Every read is scoped to the viewer's tenant (an admin's:
every tenant) through :class:`~hookline.store.base_insights.Insights`; every change goes through
the tenant-scoped store with the tenant that owns the record, after the form's token is checked.
Lists page by cursor (``?before=<id>``), never by offset, so they stay fast with 100,000 jobs."""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

from hookline.api import streams
from hookline.api.dashboard import charts
from hookline.api.dashboard.session import (
    Viewer,
    csrf_ok,
    forget,
    remember,
    viewer_for,
)
from hookline.events import attempts_of
from hookline.gateway import Gateway
from hookline.jobs import TERMINAL_STATUSES, Job, JobStatus, Operation, iso
from hookline.live.notify import DELIVERIES_AVAILABLE
from hookline.store.base_insights import JobFilter, Kind

router = APIRouter(prefix="/dashboard", include_in_schema=False)
HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
PAGE = 50
HOUR_MS = 3_600_000
ASSETS = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


class NotSignedIn(Exception):
    """Raised by :func:`signed_in` for a request without a valid key: the sign-in page."""

    def __init__(self, back_to: str) -> None:
        super().__init__(back_to)
        self.back_to = back_to


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def signed_in(request: Request) -> Viewer:
    viewer = await viewer_for(request, _gateway(request))
    if viewer is None:
        raise NotSignedIn(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return viewer


ViewerDep = Annotated[Viewer, Depends(signed_in)]


def render(
    request: Request, page: str, viewer: Viewer | None, status: int = 200, **context: Any
) -> HTMLResponse:
    response = templates.TemplateResponse(
        request, page, {"viewer": viewer, "now_ms": _gateway(request).clock.now_ms(), **context},
        status_code=status, headers=SECURITY_HEADERS,
    )  # fmt: skip
    return response


def not_found(request: Request, viewer: Viewer, what: str) -> HTMLResponse:
    return render(request, "not_found.html", viewer, status=404, what=what)


def back(to: str) -> RedirectResponse:
    return RedirectResponse(to, status_code=303, headers={"Cache-Control": "no-store"})


async def _owner(request: Request, viewer: Viewer, kind: Kind, record_id: str) -> str | None:
    """The tenant of a record this viewer may act on; None when it may not (or there is none)."""
    tenant = await _gateway(request).store.insights.owner(kind, record_id)
    return tenant if tenant is not None and viewer.may_see(tenant) else None


async def _checked_form(request: Request, viewer: Viewer) -> dict[str, Any] | None:
    form = await request.form()
    return dict(form) if csrf_ok(viewer, form.get("csrf")) else None


# --- signing in


@router.get("/login")
async def login_page(request: Request, next: str = "/dashboard") -> Response:
    if await viewer_for(request, _gateway(request)) is not None:
        return back(_local(next))
    return render(request, "login.html", None, next=_local(next))


@router.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    key, target = str(form.get("key", "")).strip(), _local(str(form.get("next", "")))
    viewer = await viewer_for(request, _gateway(request), key) if key else None
    if viewer is None:
        error = "That key is not valid (unknown, revoked or expired)." if key else "Paste a key."
        return render(request, "login.html", None, status=401, next=target, error=error)
    response = back(target)
    remember(response, request, key)
    return response


@router.post("/logout")
async def logout(request: Request, viewer: ViewerDep) -> Response:
    if await _checked_form(request, viewer) is None:
        return _forbidden(request, viewer)
    response = back("/dashboard/login")
    forget(response)
    return response


def _local(target: str) -> str:
    """Only a path of the dashboard: never an open redirect."""
    if target.startswith("/dashboard") and not target.startswith("//"):
        return target
    return "/dashboard"


def _forbidden(request: Request, viewer: Viewer) -> HTMLResponse:
    return render(request, "not_found.html", viewer, status=403,
                  what="this form has expired: reload the page and try again")  # fmt: skip


# --- the overview


@router.get("")
async def overview(request: Request, viewer: ViewerDep) -> Response:
    gateway = _gateway(request)
    now = gateway.clock.now_ms()
    insights = gateway.store.insights
    minutes = charts.by_minute(
        await insights.minutes(viewer.scope, now - HOUR_MS), now - HOUR_MS + 60_000
    )
    gauges = await insights.gauges(now, viewer.scope)
    starts = [m.minute for m in minutes]
    succeeded = sum(m.succeeded for m in minutes)
    failed = sum(m.failed for m in minutes)
    rates = [100 * m.failed / (m.failed + m.succeeded) if m.failed + m.succeeded else math.nan
             for m in minutes]  # fmt: skip
    nan = math.nan
    drawn = [
        charts.bars("Jobs finished per minute", starts, [
            charts.Series("succeeded", "ok", [m.succeeded for m in minutes]),
            charts.Series("failed", "bad", [m.failed for m in minutes]),
            charts.Series("cancelled", "muted", [m.cancelled for m in minutes]),
        ]),
        charts.lines("Error rate", starts, [charts.Series("failed", "bad", rates)], unit="%"),
        charts.lines("Latency, accept to end", starts, [
            charts.Series("average", "ok", [m.latency_avg_ms / 1000 if m.latency_avg_ms is not None else nan for m in minutes]),
            charts.Series("slowest", "warn", [m.latency_max_ms / 1000 if m.latency_max_ms is not None else nan for m in minutes]),
        ], unit="s"),
    ]  # fmt: skip
    oldest = min((at for _, at in gauges.queued.values() if at is not None), default=None)
    cards = {
        "queued": sum(n for n, _ in gauges.queued.values()),
        "oldest_queued_s": (now - oldest) / 1000 if oldest is not None else None,
        "running": sum(gauges.running.values()),
        "outbox": gauges.outbox_pending,
        "oldest_message_s": (now - gauges.outbox_oldest) / 1000 if gauges.outbox_oldest else None,
        "failing": gauges.endpoints_failing,
        "disabled": gauges.endpoints_disabled,
        "succeeded": succeeded,
        "failed": failed,
        "error_rate": 100 * failed / (succeeded + failed) if succeeded + failed else None,
    }
    return render(request, "overview.html", viewer, charts=drawn, cards=cards, section="overview")


# --- jobs


def _time(value: str | None) -> int | None:
    """A ``datetime-local`` field (UTC) as epoch ms."""
    if not value:
        return None
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


@router.get("/jobs")
async def jobs_page(
    request: Request,
    viewer: ViewerDep,
    status: Annotated[list[str], Query()] = [],  # noqa: B006 (FastAPI's idiom for a list)
    operation: str = "",
    model: str = "",
    since: str = "",
    until: str = "",
    before: str = "",
    q: str = "",
) -> Response:
    gateway = _gateway(request)
    if q.strip():  # "find a job": its id
        job = await gateway.store.get_job(q.strip(), viewer.scope)
        if job is not None and job.operation is not Operation.BATCH:
            return back(f"/dashboard/jobs/{job.id}")
        return render(request, "not_found.html", viewer, status=404, what=f"no job {q.strip()!r}")
    statuses = [s for s in status if s in {st.value for st in JobStatus}]
    where = JobFilter(
        statuses=statuses, operations=[operation] if operation else [], model=model or None,
        since=_time(since), until=_time(until),
    )  # fmt: skip
    found = await gateway.store.insights.jobs(viewer.scope, where, before or None, PAGE + 1)
    page, more = found[:PAGE], len(found) > PAGE
    filters = {"status": statuses, "operation": operation, "model": model, "since": since,
               "until": until}  # fmt: skip
    query = [("status", s) for s in statuses] + [
        (k, v) for k, v in filters.items() if k != "status" and v
    ]
    return render(request, "jobs.html", viewer, jobs=page, more=more, filters=filters,
                  query=query, statuses=[s.value for s in JobStatus],
                  operations=[o.value for o in Operation if o is not Operation.BATCH],
                  section="jobs")  # fmt: skip


@router.get("/jobs/{job_id}")
async def job_page(request: Request, viewer: ViewerDep, job_id: str) -> Response:
    gateway = _gateway(request)
    job = await gateway.store.get_job(job_id, viewer.scope)
    if job is None or job.operation is Operation.BATCH:
        return not_found(request, viewer, f"no job {job_id!r}")
    events = await gateway.store.list_events(job.id, 0, 1000)
    deliveries = await gateway.store.insights.deliveries(viewer.scope, job_id=job.id, limit=PAGE)
    return render(
        request, "job.html", viewer, job=job, events=events, attempts=attempts_of(events),
        deliveries=deliveries, text=_output_text(job), live=job.status not in TERMINAL_STATUSES,
        last_seq=events[-1].seq if events else 0, pretty=_pretty, section="jobs",
    )  # fmt: skip


@router.get("/jobs/{job_id}/events")
async def job_events(
    request: Request, viewer: ViewerDep, job_id: str, after: str | None = None
) -> Response:
    """The job's events as SSE (the job page follows them live), as ``/v1/jobs/{id}/events``."""
    tenant = await _owner(request, viewer, "job", job_id)
    if tenant is None:
        return Response(status_code=404)
    return await streams.job_events(job_id, request, _gateway(request), tenant, after)


def _output_text(job: Job) -> str | None:
    output = job.output
    if not isinstance(output, dict):
        return None
    choices = output.get("choices")
    if isinstance(choices, list):
        texts = []
        for choice in choices:
            if isinstance(choice, dict):
                message = choice.get("message")
                content = (
                    message.get("content") if isinstance(message, dict) else choice.get("text")
                )
                if isinstance(content, str):
                    texts.append(content)
        return "\n\n".join(texts) if texts else None
    if isinstance(output.get("data"), list):
        return f"{len(output['data'])} embedding(s)"
    return None


def _pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


# --- deliveries and endpoints


@router.get("/deliveries")
async def deliveries_page(
    request: Request,
    viewer: ViewerDep,
    status: str = "",
    endpoint: str = "",
    sink: str = "",
    before: str = "",
) -> Response:
    status = status if status in ("pending", "succeeded", "failed") else ""
    found = await _gateway(request).store.insights.deliveries(
        viewer.scope, status=status or None, endpoint_id=endpoint or None, sink=sink or None,
        before_id=before or None, limit=PAGE + 1,
    )  # fmt: skip
    query = [(k, v) for k, v in (("status", status), ("endpoint", endpoint), ("sink", sink)) if v]
    return render(request, "deliveries.html", viewer, deliveries=found[:PAGE],
                  more=len(found) > PAGE, state=status, endpoint=endpoint, sink=sink, query=query,
                  section="deliveries")  # fmt: skip


@router.get("/deliveries/{delivery_id}")
async def delivery_page(request: Request, viewer: ViewerDep, delivery_id: str) -> Response:
    tenant = await _owner(request, viewer, "delivery", delivery_id)
    found = (
        await _gateway(request).store.webhooks.get_delivery(tenant, delivery_id) if tenant else None
    )
    if found is None:
        return not_found(request, viewer, f"no delivery {delivery_id!r}")
    delivery, attempts = found
    return render(request, "delivery.html", viewer, delivery=delivery, attempts=attempts,
                  pretty=_pretty, replayed=request.query_params.get("replayed"),
                  section="deliveries")  # fmt: skip


def _wake_senders(gateway: Gateway) -> None:
    if gateway.sender is not None:
        gateway.sender.wake()
    gateway.notifier.publish(DELIVERIES_AVAILABLE)  # (the broadcast carries it to the workers)


@router.post("/deliveries/{delivery_id}/replay")
async def replay_delivery(request: Request, viewer: ViewerDep, delivery_id: str) -> Response:
    if await _checked_form(request, viewer) is None:
        return _forbidden(request, viewer)
    gateway = _gateway(request)
    tenant = await _owner(request, viewer, "delivery", delivery_id)
    if tenant is None or not await gateway.store.webhooks.resend(
        tenant, gateway.clock.now_ms(), delivery_id=delivery_id
    ):
        return not_found(request, viewer, f"no delivery {delivery_id!r}")
    _wake_senders(gateway)
    return back(f"/dashboard/deliveries/{delivery_id}?replayed=1")


@router.get("/endpoints")
async def endpoints_page(request: Request, viewer: ViewerDep) -> Response:
    endpoints = await _gateway(request).store.insights.endpoints(viewer.scope)
    return render(request, "endpoints.html", viewer, endpoints=endpoints, section="endpoints")


@router.post("/endpoints/{endpoint_id}/{action}")
async def endpoint_action(
    request: Request, viewer: ViewerDep, endpoint_id: str, action: str
) -> Response:
    """``enable``, ``disable``, ``rotate`` (its secret), ``test`` (send a test event) or
    ``replay`` (every failed message of the endpoint)."""
    if await _checked_form(request, viewer) is None:
        return _forbidden(request, viewer)
    gateway = _gateway(request)
    webhooks, now = gateway.store.webhooks, gateway.clock.now_ms()
    tenant = await _owner(request, viewer, "endpoint", endpoint_id)
    if tenant is None or action not in ("enable", "disable", "rotate", "test", "replay"):
        return not_found(request, viewer, f"no endpoint {endpoint_id!r}")
    notice, secret = "", None
    if action in ("enable", "disable"):
        enabled = action == "enable"
        fields: dict[str, Any] = {"enabled": enabled,
                                  "disabled_reason": None if enabled else "disabled in the dashboard"}  # fmt: skip
        if enabled:
            fields["failing_since"] = None
        await webhooks.update_endpoint(tenant, endpoint_id, fields, now)
        notice = f"Endpoint {endpoint_id} {action}d."
    elif action == "rotate":
        overlap = int(gateway.settings.webhooks.secret_overlap_seconds * 1000)
        await webhooks.rotate_secret(tenant, endpoint_id, overlap, now)
        secret = (await webhooks.signing_secrets(tenant, endpoint_id, now))[0]
        notice = f"Secret of {endpoint_id} rotated; the old one signs beside it for its overlap."
    elif action == "test":
        message = await webhooks.send_test(tenant, endpoint_id, now)
        notice = f"Test event queued as {message}."
    else:
        count = await webhooks.resend(tenant, now, endpoint_id=endpoint_id)
        notice = f"{count} failed message(s) of {endpoint_id} queued again."
    _wake_senders(gateway)
    endpoints = await gateway.store.insights.endpoints(viewer.scope)
    return render(request, "endpoints.html", viewer, endpoints=endpoints, notice=notice,
                  secret=secret, section="endpoints")  # fmt: skip


# --- batches and upstreams


@router.get("/batches")
async def batches_page(
    request: Request, viewer: ViewerDep, before: str = "", partial: bool = False
) -> Response:
    found = await _gateway(request).store.insights.batches(viewer.scope, before or None, PAGE + 1)
    page = "_batch_rows.html" if partial else "batches.html"
    return render(request, page, viewer, batches=found[:PAGE], more=len(found) > PAGE,
                  section="batches")  # fmt: skip


@router.get("/upstreams")
async def upstreams_page(request: Request, viewer: ViewerDep) -> Response:
    gateway = _gateway(request)
    now = gateway.clock.now_ms()
    load = {
        u.name: u for u in await gateway.store.insights.upstream_load(viewer.scope, now - HOUR_MS)
    }
    rows = []
    for config in gateway.settings.upstreams:
        check = gateway.checks.get(f"upstream:{config.name}")
        rows.append({"config": config, "load": load.get(config.name),
                     "health": await check() if check is not None else None})  # fmt: skip
    return render(request, "upstreams.html", viewer, upstreams=rows, section="upstreams")


# --- assets


@router.get("/assets/{name}")
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        return Response(status_code=404)
    return Response((HERE / "assets" / name).read_bytes(), media_type=media_type,
                    headers={"Cache-Control": "public, max-age=300"})  # fmt: skip


# --- template helpers


def _when(ms: int | None) -> str:
    return (iso(ms) or "").replace("T", " ").replace("Z", " UTC")


def _ago(ms: int | None, now: int) -> str:
    if ms is None:
        return ""
    seconds = max(0, (now - ms) / 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 60:
        return f"{value / 60:.1f} min"
    return f"{value:.1f} s" if value >= 1 else f"{value * 1000:.0f} ms"


templates.env.filters.update(when=_when, seconds=_seconds)
templates.env.globals.update(ago=_ago)
