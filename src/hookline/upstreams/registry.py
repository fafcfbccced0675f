"""Which class serves each upstream ``type`` of the configuration. Each implementation registers
itself (``@register("openai")``); the package's ``__init__`` imports them all, so the interface in
:mod:`hookline.upstreams.base` never imports its implementations."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from hookline.config import Settings, UpstreamConfig
from hookline.upstreams.base import Upstream

Factory = Callable[[UpstreamConfig], Upstream]
U = TypeVar("U", bound=type[Upstream])

_KINDS: dict[str, Factory] = {}


def register(kind: str) -> Callable[[U], U]:
    """Class decorator: the class serves upstreams of ``type = kind``."""

    def decorate(cls: U) -> U:
        if kind in _KINDS:
            raise ValueError(f"upstream type {kind!r} is registered twice")
        _KINDS[kind] = cls
        return cls

    return decorate


def kinds() -> list[str]:
    """The upstream types that can be configured."""
    return sorted(_KINDS)


def build_upstreams(settings: Settings) -> dict[str, Upstream]:
    """One :class:`Upstream` per configured entry, keyed by name."""
    unknown = {u.type for u in settings.upstreams} - set(_KINDS)
    if unknown:
        raise ValueError(f"unknown upstream type(s) {sorted(unknown)}: known are {kinds()}")
    return {u.name: _KINDS[u.type](u) for u in settings.upstreams}
