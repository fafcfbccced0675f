"""What the client raises.

    ClientError            hookline answered with an error (``status``, the problem+json ``problem``)
    ├── AuthError          401: the API key is missing, wrong or revoked
    ├── NotFound           404: no such job, batch or file for this key's tenant
    ├── RateLimited        429: try again after ``retry_after`` seconds
    ├── Timeout            the job or batch did not end in the time given (it keeps running)
    └── JobFailed          the job ended without a result (``job``, the upstream's ``error``)

A gateway that cannot be reached, after the retries, raises httpx's own ``httpx.TransportError``.
:func:`raise_for_status` maps an answer to this tree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from hookline.client.models import Job


class ClientError(Exception):
    """A call to hookline failed; ``status`` and ``problem`` (the problem+json body) if it
    answered."""

    def __init__(
        self, message: str, status: int | None = None, problem: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem or {}


class AuthError(ClientError):
    """The API key is missing, wrong or revoked (401)."""


class NotFound(ClientError):
    """No such job, batch or file for this key's tenant (404)."""


class RateLimited(ClientError):
    """Too many requests (429): try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float | None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class Timeout(ClientError):
    """The job (or batch) did not finish in the time given; it keeps running."""


class JobFailed(ClientError):
    """The job ended without a result: ``job.status`` is failed, cancelled or expired, and
    ``job.error`` carries the upstream's error."""

    def __init__(self, job: Job) -> None:
        error = job.error or {}
        super().__init__(f"job {job.id} {job.status}: {error.get('message') or error}")
        self.job = job
        self.error = error


def raise_for_status(response: httpx.Response) -> None:
    """Raise the :class:`ClientError` an error answer (4xx, 5xx) stands for; nothing otherwise.
    A streamed response must have been read first."""
    if response.status_code < 400:
        return
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        problem = {"detail": response.text}
    detail = problem.get("detail") or problem.get("title") or response.reason_phrase
    message = f"{response.status_code}: {detail}"
    kwargs: dict[str, Any] = {"status": response.status_code, "problem": problem}
    if response.status_code == 401:
        raise AuthError(message, **kwargs)
    if response.status_code == 404:
        raise NotFound(message, **kwargs)
    if response.status_code == 429:
        retry_after = response.headers.get("retry-after")
        seconds = float(retry_after) if retry_after and retry_after.isdigit() else None
        raise RateLimited(message, seconds, **kwargs)
    raise ClientError(message, **kwargs)
