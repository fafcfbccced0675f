"""The Python client: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio), the same
methods, httpx underneath.

    from hookline.client import Client

    with Client() as client:                       # HOOKLINE_URL, HOOKLINE_API_KEY
        job = client.submit("chat.completions", {"messages": [{"role": "user", "content": "Hi"}]},
                            model="local")
        print(client.wait(job).text)

Every submit carries an idempotency key (a fresh one unless you give yours), so the client can
retry it after a dropped connection without making two jobs. Only such calls are retried
(submits, reads, cancels), and only on transient network errors and 502/503/504, with backoff.
:meth:`Client.stream` follows a job's events and text, reconnecting with ``Last-Event-ID``
after a dropped connection: the text it yields concatenates to exactly the output.

The package imports nothing of the server: ``models`` (what calls return), ``errors`` (what they
raise), ``_core`` (every call written once, without I/O), ``sync`` and ``aio`` (the I/O), and
``listen`` (``hookline listen``).
"""

from hookline.client.aio import AsyncClient
from hookline.client.errors import (
    AuthError,
    ClientError,
    JobFailed,
    NotFound,
    RateLimited,
    Timeout,
)
from hookline.client.models import (
    Attempt,
    Batch,
    BatchResult,
    Delivery,
    Event,
    Job,
    JobPage,
    TextDelta,
)
from hookline.client.sync import Client

__all__ = [
    "AsyncClient",
    "Attempt",
    "AuthError",
    "Batch",
    "BatchResult",
    "Client",
    "ClientError",
    "Delivery",
    "Event",
    "Job",
    "JobFailed",
    "JobPage",
    "NotFound",
    "RateLimited",
    "TextDelta",
    "Timeout",
]
