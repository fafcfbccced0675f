"""``/v1/jobs``: submit, read, long-poll, list, cancel, and the event log."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from hookline.api.deps import GatewayDep, TenantDep, get_caller
from hookline.api.problems import json_response
from hookline.api.schemas import JobCreate, JobList, JobOperation, JobOut, page_cursor
from hookline.api.sinks import with_sinks
from hookline.delivery.webhooks.ssrf import check_url
from hookline.errors import InvalidRequest
from hookline.gateway import Gateway
from hookline.jobs import Job, JobStatus, Lane, Operation, job_json
from hookline.queue import SubmitRequest

router = APIRouter(prefix="/v1", tags=["jobs"])

_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d+(?:\.\d+)?)\"?", re.IGNORECASE)
# A caller who would rather be refused (429) than queued behind its tenant's limits.
_PREFER_NOT_ASYNC = re.compile(r"(?:^|[,;\s])respond-async\s*=\s*\"?false\"?", re.IGNORECASE)
_MAX_PAGE = 200


def _prefer_wait(prefer: str | None, cap: float) -> float:
    if not prefer:
        return 0.0
    match = _PREFER_WAIT.search(prefer)
    return min(float(match.group(1)), cap) if match else 0.0


_SUBMIT_HEADERS = [
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "maxLength": 256},
        "description": "Same key and body: the first job is returned. Same key, other body: 409.",
    },
    {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": (
            "wait=N (N ≤ 60): answer 200 with the finished job if it is done in time. "
            "respond-async=false: a job its tenant's limits would keep waiting is refused "
            "(429, Retry-After) instead of queued."
        ),
    },
]


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobOut,
    responses={
        200: {"model": JobOut, "description": "Finished within Prefer: wait=N"},
        402: {"description": "The tenant's token budget is spent (docs/fairness.md)."},
        409: {"description": "The Idempotency-Key was used with another body."},
        429: {"description": "Prefer: respond-async=false, and a limit holds the job back."},
    },
    summary="Submit a job",
    openapi_extra={"parameters": _SUBMIT_HEADERS},
)
async def submit_job(body: JobCreate, request: Request) -> Response:
    """Queue a job durably and answer ``202`` with it. With ``Prefer: wait=N`` (N ≤ 60) answer
    ``200`` with the finished job if it finishes within N seconds. A repeated ``Idempotency-Key``
    with the same body returns the first job; with a different body it is a ``409``."""
    # The hottest route reads its headers itself: FastAPI's dependency solving would cost more
    # than the whole durable insert (see docs/benchmarks.md).
    gateway: Gateway = request.app.state.gateway
    headers = request.headers
    caller = await get_caller(request)
    tenant = caller.tenant
    idempotency_key = headers.get("idempotency-key") or None
    if idempotency_key is not None and len(idempotency_key) > 256:
        raise InvalidRequest("the Idempotency-Key header is longer than 256 characters")
    assert body.model is not None  # filled in by the validator
    operation = Operation(body.operation)
    upstream = gateway.queue.router.choose(body.model, operation.value)
    webhook = None
    if body.webhook is not None:
        await check_url(body.webhook.url, gateway.address_policy)
        webhook = body.webhook.model_dump()
    if body.sinks:
        webhook = with_sinks(gateway, tenant, webhook, body.sinks)
    wait = _prefer_wait(headers.get("prefer"), gateway.settings.jobs.max_wait_seconds)
    submission = SubmitRequest(
        operation=operation,
        input=body.input,
        model=body.model,
        upstream=upstream.name,
        metadata=body.metadata,
        priority=body.priority,
        ttl_seconds=body.ttl_seconds,
        idempotency_key=idempotency_key,
        webhook=webhook,
        lane=Lane.INTERACTIVE if wait > 0 else Lane.DEFAULT,  # a caller waiting goes first
    )
    refuse = _PREFER_NOT_ASYNC.search(headers.get("prefer") or "") is not None
    job, _created = await gateway.queue.submit(
        tenant, submission, refuse_when_held=refuse, key_id=caller.key_id, key_limits=caller.limits
    )
    response_headers = {"Location": f"/v1/jobs/{job.id}"}
    if wait > 0 and not job.status.is_terminal:
        job = await gateway.queue.wait_until_terminal(tenant, job.id, wait)
        response_headers["Preference-Applied"] = f"wait={wait:g}"
    status = 200 if job.status.is_terminal and wait > 0 else 202
    return json_response(await _shown(gateway, job), status, response_headers)


async def _shown(gateway: Gateway, job: Job) -> dict[str, Any]:
    """The job's JSON, with the limit that holds it back when one does (hookline.fairness)."""
    return {**job_json(job), **await gateway.queue.waiting_for(job)}


@router.get("/jobs/{job_id}", response_model=JobOut, summary="Get a job (optionally long-poll)")
async def get_job(
    job_id: str,
    gateway: GatewayDep,
    tenant: TenantDep,
    wait: Annotated[float, Query(ge=0, description="Long-poll up to N seconds (≤ 60)")] = 0,
) -> Response:
    """The job; with ``wait=N``, held until the job is terminal or N seconds have passed. A
    queued job also shows its ``queue`` position and estimated start, and every job its
    ``attempt_log``: each attempt's upstream, model, times, outcome and error (only here, not
    in the list)."""
    if wait > 0:
        job = await gateway.queue.wait_until_terminal(
            tenant, job_id, min(wait, gateway.settings.jobs.max_wait_seconds)
        )
    else:
        job = await gateway.queue.get(tenant, job_id)
    shown = await _shown(gateway, job)
    if job.status is JobStatus.QUEUED:
        shown["queue"] = await gateway.queue.position(job)
    shown["attempt_log"] = await gateway.queue.attempt_log(job)
    return json_response(shown)


@router.get(
    "/jobs",
    response_model=JobList,
    summary="List jobs, newest first",
    responses={400: {"description": "A cursor this list did not give."}},
)
async def list_jobs(
    gateway: GatewayDep,
    tenant: TenantDep,
    status: Annotated[list[JobStatus] | None, Query()] = None,
    operation: Annotated[list[JobOperation] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 50,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """Pages of the tenant's jobs; pass ``next_cursor`` back as ``cursor`` for the next page."""
    jobs = await gateway.queue.list_jobs(
        tenant,
        statuses=status or (),
        operations=[o.value for o in operation or ()],
        before_id=page_cursor(cursor, "job"),
        limit=limit + 1,
    )
    page, has_more = jobs[:limit], len(jobs) > limit
    return json_response(
        {
            "object": "list",
            "data": [job_json(job) for job in page],
            "has_more": has_more,
            "next_cursor": page[-1].id if has_more else None,
        }
    )


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, summary="Cancel a job")
async def cancel_job(job_id: str, gateway: GatewayDep, tenant: TenantDep) -> Response:
    """Cancel a queued job at once, or abort a running one's upstream call. A job that is already
    finished is returned unchanged."""
    return json_response(job_json(await gateway.queue.cancel(tenant, job_id)))
