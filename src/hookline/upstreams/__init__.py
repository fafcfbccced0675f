"""Model providers behind hookline. Each upstream turns one job's request into a final output,
reporting streamed text as it arrives. :mod:`~hookline.upstreams.base` is the interface,
:mod:`~hookline.upstreams.registry` maps a configured ``type`` to its class; importing this package
registers every implementation."""

from hookline.upstreams import (  # noqa: F401 (they register themselves)
    anthropic,
    llama,
    openai,
)
from hookline.upstreams.base import DeltaSink, Upstream, UpstreamError
from hookline.upstreams.registry import build_upstreams, kinds, register

__all__ = ["DeltaSink", "Upstream", "UpstreamError", "build_upstreams", "kinds", "register"]
