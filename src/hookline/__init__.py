"""hookline: a self-hosted asynchronous AI gateway.

The Python client is :mod:`hookline.client` (``from hookline.client import Client``); receivers
verify webhooks with ``hookline.webhooks.verify``. Importing ``hookline`` loads neither: the
server never loads the client.
"""

from typing import Any

from hookline._version import __version__

# `from hookline import Client` worked before the client had a package of its own: the two client
# classes still resolve, loading hookline.client (and httpx) only when asked for. The client's
# records and errors (Job, Event, NotFound, ...) are hookline.client's only: `hookline.Job` would
# be a second meaning of hookline.jobs.Job, the server's record.
_CLIENT_NAMES = frozenset({"AsyncClient", "Client"})

__all__ = ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from hookline import client

        return getattr(client, name)
    raise AttributeError(f"module 'hookline' has no attribute {name!r}")
