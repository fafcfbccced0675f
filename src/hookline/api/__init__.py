"""The HTTP API (FastAPI): ``create_app`` builds it around a :class:`~hookline.gateway.Gateway`."""

from hookline.api.app import create_app

__all__ = ["create_app"]
