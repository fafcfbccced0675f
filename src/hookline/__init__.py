"""hookline: a self-hosted asynchronous AI gateway.

The client side lives here too: ``from hookline import Client, AsyncClient`` (see
:mod:`hookline.client`), and ``hookline.webhooks.verify`` for receivers.
"""

from hookline.client import (
    AsyncClient,
    AuthError,
    Batch,
    BatchResult,
    Client,
    ClientError,
    Event,
    Job,
    JobFailed,
    NotFound,
    RateLimited,
    TextDelta,
    Timeout,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AuthError",
    "Batch",
    "BatchResult",
    "Client",
    "ClientError",
    "Event",
    "Job",
    "JobFailed",
    "NotFound",
    "RateLimited",
    "TextDelta",
    "Timeout",
    "__version__",
]
