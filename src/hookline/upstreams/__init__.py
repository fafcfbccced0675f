"""Model providers behind hookline. Each upstream turns one job's request into a final output,
reporting streamed text as it arrives."""

from hookline.upstreams.base import DeltaSink, Upstream, UpstreamError, build_upstreams

__all__ = ["DeltaSink", "Upstream", "UpstreamError", "build_upstreams"]
