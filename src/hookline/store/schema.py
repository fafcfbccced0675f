"""The database schema as SQLAlchemy Core tables. Migrations under ``hookline/store/migrations`` create it;
``tests/test_migrations.py`` checks the two agree.

Times are epoch milliseconds (BIGINT) on every database: exact, cheap to compare, and free of the
SQLite/PostgreSQL differences in timestamp handling.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData()

# JSONB on PostgreSQL, JSON text on SQLite.
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
# SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# A key with limits the claim holds its jobs to (hookline.store.claim).
KEY_LIMITED = (
    "max_concurrency IS NOT NULL OR requests_per_minute IS NOT NULL"
    " OR tokens_per_minute IS NOT NULL"
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("revoked_at", sa.BigInteger, nullable=True),
    sa.Column("name", sa.String(128), nullable=True),
    sa.Column("expires_at", sa.BigInteger, nullable=True),
    sa.Column("last_used_at", sa.BigInteger, nullable=True),
    sa.Column("admin", sa.Boolean, nullable=False, server_default=sa.false()),
    # The key's own limits (hookline.fairness.KeyLimits), within its tenant's; NULL: none.
    sa.Column("max_concurrency", sa.Integer, nullable=True),
    sa.Column("requests_per_minute", sa.Integer, nullable=True),
    sa.Column("tokens_per_minute", sa.Integer, nullable=True),
    sa.Column("daily_token_budget", sa.BigInteger, nullable=True),
    sa.Column("monthly_token_budget", sa.BigInteger, nullable=True),
    # The claim asks, per tenant with queued jobs, whether one of its keys has limits of its
    # own: a seek in this index, which holds only such keys (most have none).
    sa.Index(
        "ix_api_keys_limited",
        "tenant",
        sqlite_where=sa.text(KEY_LIMITED),
        postgresql_where=sa.text(KEY_LIMITED),
    ),
)

# What is stored of a tenant beyond its keys: its weight in fair sharing (hookline.fairness),
# set by `hookline keys create --weight`. A weight in the tenant's [[tenants]] entry wins.
tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("weight", sa.Float, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("operation", sa.String(32), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("upstream", sa.String(64), nullable=False),
    sa.Column("input", JSONType, nullable=False),
    sa.Column("output", JSONType, nullable=True),
    sa.Column("error", JSONType, nullable=True),
    sa.Column("metadata", JSONType, nullable=True),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("idempotency_key", sa.String(256), nullable=True),
    sa.Column("request_hash", sa.String(64), nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("started_at", sa.BigInteger, nullable=True),
    sa.Column("finished_at", sa.BigInteger, nullable=True),
    sa.Column("expires_at", sa.BigInteger, nullable=True),
    sa.Column("run_after", sa.BigInteger, nullable=False),
    sa.Column("lease_token", sa.String(40), nullable=True),
    sa.Column("lease_expires_at", sa.BigInteger, nullable=True),
    sa.Column("event_seq", sa.Integer, nullable=False),
    # A job's own deliveries: {"url", "events"} of its webhook, and "sinks" (names) it asked for.
    sa.Column("webhook", JSONType, nullable=True),
    # An item of a batch: the batch and the item's line in the input file (1-based).
    sa.Column("batch_id", sa.String(40), nullable=True),
    sa.Column("batch_line", sa.Integer, nullable=True),
    sa.Column("custom_id", sa.String(512), nullable=True),
    sa.Column("traceparent", sa.String(64), nullable=True),  # the submitter's W3C trace context
    # Fair sharing (hookline.fairness): the job's lane, the tokens a start reserves under a
    # token limit, and the last attempt's usage.
    sa.Column("lane", sa.String(16), nullable=False, server_default="default"),
    sa.Column("expected_tokens", sa.Integer, nullable=True),
    sa.Column("input_tokens", sa.Integer, nullable=True),
    sa.Column("output_tokens", sa.Integer, nullable=True),
    sa.Column("key_id", sa.String(40), nullable=True),  # the API key that submitted it
    # Partial indexes: most jobs have no idempotency key and are not running, and an index entry
    # that is never looked up still costs every insert.
    sa.Index(
        "uq_jobs_tenant_idempotency_key",
        "tenant",
        "idempotency_key",
        unique=True,
        sqlite_where=sa.text("idempotency_key IS NOT NULL"),
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    ),
    # The claim (hookline.store.claim): the tenants with queued jobs in each lane of an upstream,
    # then each one's next jobs, highest priority first, then FIFO.
    sa.Index("ix_jobs_claim", "status", "upstream", "lane", "tenant", sa.desc("priority"), "id"),
    sa.Index("ix_jobs_tenant_id", "tenant", "id"),
    # A batch's items, by status (progress) and by line (the result files).
    sa.Index(
        "ix_jobs_batch",
        "batch_id",
        "batch_line",
        sqlite_where=sa.text("batch_id IS NOT NULL"),
        postgresql_where=sa.text("batch_id IS NOT NULL"),
    ),
    # Retention: the oldest finished jobs first.
    sa.Index(
        "ix_jobs_finished",
        "finished_at",
        sqlite_where=sa.text("finished_at IS NOT NULL"),
        postgresql_where=sa.text("finished_at IS NOT NULL"),
    ),
    sa.Index(
        "ix_jobs_running_lease",
        "lease_expires_at",
        sqlite_where=sa.text("status = 'running'"),
        postgresql_where=sa.text("status = 'running'"),
    ),
)

# Token buckets of the upstreams with a rate limit: calls started per second across all workers.
upstream_rates = sa.Table(
    "upstream_rates",
    metadata,
    sa.Column("upstream", sa.String(64), primary_key=True),
    sa.Column("tokens", sa.Float, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
)

# Fair sharing's memory, kept by the claims (hookline.store.claim): per upstream and lane, each
# tenant's virtual time (its ``pass``: how much it was served, divided by its weight) and, in the
# row of tenant '', the lane's own clock and (batch lane) the starts owed to it by its floor.
fair_shares = sa.Table(
    "fair_shares",
    metadata,
    sa.Column("upstream", sa.String(64), primary_key=True),
    sa.Column("lane", sa.String(16), primary_key=True),
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("pass", sa.Float, nullable=False),
    sa.Column("credit", sa.Float, nullable=False, server_default="0"),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
)

# The starts of the last minute under a per-minute limit (a tenant's requests or tokens, an
# upstream's tokens): one row per scope (``t:<tenant>``, ``u:<upstream>``) and attempt, holding
# the tokens reserved at the start and settled from the usage at the end. Rows older than a
# minute are deleted by the claims that add new ones.
usage_window = sa.Table(
    "usage_window",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("scope", sa.String(80), nullable=False),
    sa.Column("job_id", sa.String(40), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("started_at", sa.BigInteger, nullable=False),
    sa.Column("tokens", sa.Integer, nullable=False),
    sa.Index("ix_usage_window_scope", "scope", "started_at"),
    sa.Index("ix_usage_window_job", "job_id", "attempt"),
    sqlite_autoincrement=True,
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column(
        "job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("data", JSONType, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    # PostgreSQL: the writing transaction (default pg_current_xact_id(), set by migration 0004).
    # The tenant stream reads only events of transactions older than every running one.
    sa.Column("txid", sa.BigInteger, nullable=True),
    sa.UniqueConstraint("job_id", "seq", name="uq_events_job_seq"),
    sa.Index("ix_events_tenant_id", "tenant", "id"),
    sqlite_autoincrement=True,
)

# --- webhooks

webhook_endpoints = sa.Table(
    "webhook_endpoints",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("description", sa.String(512), nullable=True),
    sa.Column("events", JSONType, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("disabled_reason", sa.String(512), nullable=True),
    sa.Column("rate_limit_per_second", sa.Float, nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("last_success_at", sa.BigInteger, nullable=True),
    sa.Column("failing_since", sa.BigInteger, nullable=True),
    sa.Index("ix_webhook_endpoints_tenant", "tenant", "id"),
)

# Signing secrets: endpoint_id NULL is the tenant's default secret (for per-job webhook URLs).
# A rotated-out secret keeps signing until retires_at.
webhook_secrets = sa.Table(
    "webhook_secrets",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("endpoint_id", sa.String(40), nullable=True),
    sa.Column("secret", sa.String(128), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("retires_at", sa.BigInteger, nullable=True),
    sa.Index("ix_webhook_secrets_owner", "tenant", "endpoint_id"),
)

# The outbox: one row per message to send, written in the transaction of the event it reports.
# Its id is the message's stable webhook-id. order_key is destination + job: only the first
# pending message of an order_key (by seq, then id) may be sent, which keeps one job's messages
# in order.
deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("endpoint_id", sa.String(40), nullable=True),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("job_id", sa.String(40), nullable=True),
    sa.Column("event_type", sa.String(64), nullable=False),
    sa.Column("payload", JSONType, nullable=False),
    sa.Column("order_key", sa.String(128), nullable=False),
    # The reported event's per-job seq: a job's messages go out in (seq, id) order, whatever the
    # clocks of the processes that wrote them (ids are time-based).
    sa.Column("seq", sa.Integer, nullable=False, server_default="0"),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", sa.BigInteger, nullable=False),
    sa.Column("lease_token", sa.String(40), nullable=True),
    sa.Column("lease_expires_at", sa.BigInteger, nullable=True),
    sa.Column("last_status_code", sa.Integer, nullable=True),
    sa.Column("last_error", sa.String(1024), nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("traceparent", sa.String(64), nullable=True),  # its job's, sent as a header
    # The destination's kind: NULL for a webhook (to ``url``), else the data sink's name (``url``
    # then reads ``sink:<name>``).
    sa.Column("sink", sa.String(64), nullable=True),
    sa.Index(
        "ix_deliveries_due",
        "next_attempt_at",
        sqlite_where=sa.text("status = 'pending'"),
        postgresql_where=sa.text("status = 'pending'"),
    ),
    sa.Index("ix_deliveries_order", "order_key", "status", "seq", "id"),
    sa.Index("ix_deliveries_tenant", "tenant", "id"),
    sa.Index("ix_deliveries_endpoint", "endpoint_id", "status", "id"),
    # Retention: the messages settled longest ago first.
    sa.Index(
        "ix_deliveries_settled",
        "updated_at",
        sqlite_where=sa.text("status <> 'pending'"),
        postgresql_where=sa.text("status <> 'pending'"),
    ),
)

# Every attempt to send a message. delivery_id refers to deliveries.id without a foreign key (a
# check per logged attempt cost the sender about a tenth of its messages/s on PostgreSQL): an
# attempt is logged only for a message whose lease its transaction holds, and retention deletes a
# message's attempts with it (migration 0006).
delivery_attempts = sa.Table(
    "delivery_attempts",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("delivery_id", sa.String(40), nullable=False),
    sa.Column("attempted_at", sa.BigInteger, nullable=False),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("latency_ms", sa.Integer, nullable=False),
    sa.Column("error", sa.String(1024), nullable=True),
    sa.Column("response_excerpt", sa.Text, nullable=True),
    sa.Index("ix_delivery_attempts_delivery", "delivery_id", "id"),
    sqlite_autoincrement=True,
)

# --- batches and files

# Uploaded files (purpose "batch") and the result files of batches; the content is kept in
# chunks so that a 200 MB file is streamed in and out, never held whole in memory.
files = sa.Table(
    "files",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("filename", sa.String(512), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Index("ix_files_tenant", "tenant", "id"),
)

file_chunks = sa.Table(
    "file_chunks",
    metadata,
    sa.Column(
        "file_id", sa.String(40), sa.ForeignKey("files.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("n", sa.Integer, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

# A batch. Its items are jobs (jobs.batch_id); its events live in the event log under its id,
# carried by an anchor row in jobs (operation "batch", never claimed) that holds its sequence and
# webhook, so streams, the tenant stream and webhooks serve batches as they serve jobs.
batches = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("input_file_id", sa.String(40), nullable=False),
    sa.Column("output_file_id", sa.String(40), nullable=True),
    sa.Column("error_file_id", sa.String(40), nullable=True),
    sa.Column("completion_window", sa.String(16), nullable=False),
    sa.Column("metadata", JSONType, nullable=True),
    sa.Column("errors", JSONType, nullable=True),
    sa.Column("item_events", JSONType, nullable=False),  # job.* types the webhook wants per item
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("completed", sa.Integer, nullable=False),
    sa.Column("failed", sa.Integer, nullable=False),
    sa.Column("lines_queued", sa.Integer, nullable=False),  # items written so far (resumable)
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Column("in_progress_at", sa.BigInteger, nullable=True),
    sa.Column("finalizing_at", sa.BigInteger, nullable=True),
    sa.Column("completed_at", sa.BigInteger, nullable=True),
    sa.Column("failed_at", sa.BigInteger, nullable=True),
    sa.Column("expired_at", sa.BigInteger, nullable=True),
    sa.Column("cancelling_at", sa.BigInteger, nullable=True),
    sa.Column("cancelled_at", sa.BigInteger, nullable=True),
    sa.Column("progress_at", sa.BigInteger, nullable=True),  # last batch.progress event
    sa.Column("lease_token", sa.String(40), nullable=True),  # the runner looking after it
    sa.Column("lease_expires_at", sa.BigInteger, nullable=True),
    # The upstreams whose items run as provider batches (docs/async-upstreams.md); NULL: none.
    sa.Column("provider_upstreams", JSONType, nullable=True),
    sa.Index("ix_batches_tenant", "tenant", "id"),
    sa.Index("ix_batches_status", "status"),
)

# A provider batch: one part of a hookline batch's items, run by an upstream's own batch API
# (hookline.batches.provider). Its ids at the provider are written in the transaction that
# records its creation; ``creating_at`` says a creation was tried, so a process that takes over
# looks the batch up at the provider (by its metadata) before it creates one again.
provider_batches = sa.Table(
    "provider_batches",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # <batch id>.<part>
    sa.Column("batch_id", sa.String(40), nullable=False),
    sa.Column("part", sa.Integer, nullable=False),
    sa.Column("upstream", sa.String(64), nullable=False),
    sa.Column("first_line", sa.Integer, nullable=False),  # its items' lines, both included
    sa.Column("last_line", sa.Integer, nullable=False),
    sa.Column("requests", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # pending creating submitted fetching done
    sa.Column("provider_status", sa.String(32), nullable=True),
    sa.Column("provider_batch_id", sa.String(128), nullable=True),
    sa.Column("provider_file_id", sa.String(128), nullable=True),
    sa.Column("output_file_id", sa.String(128), nullable=True),
    sa.Column("error_file_id", sa.String(128), nullable=True),
    sa.Column("results_url", sa.String(2048), nullable=True),
    sa.Column("completed", sa.Integer, nullable=False),  # the provider's request_counts
    sa.Column("failed", sa.Integer, nullable=False),
    sa.Column("errors", JSONType, nullable=True),
    sa.Column("stop", sa.String(16), nullable=True),  # cancelled | expired: being stopped, why
    sa.Column("stop_sent", sa.Boolean, nullable=False),
    sa.Column("creating_at", sa.BigInteger, nullable=True),
    sa.Column("next_poll_at", sa.BigInteger, nullable=False),
    sa.Column("poll_ms", sa.Integer, nullable=False),  # the wait before the next poll
    sa.Column("polls", sa.Integer, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Index("ix_provider_batches_batch", "batch_id", "part"),
    sa.Index("ix_provider_batches_provider", "upstream", "provider_batch_id"),
)

# Inbound webhooks seen (POST /v1/inbound/{upstream}): a replayed webhook-id is refused. Rows
# older than twice the timestamp tolerance are deleted as new ones come.
inbound_webhooks = sa.Table(
    "inbound_webhooks",
    metadata,
    sa.Column("upstream", sa.String(64), primary_key=True),
    sa.Column("webhook_id", sa.String(256), primary_key=True),
    sa.Column("received_at", sa.BigInteger, nullable=False),
    sa.Index("ix_inbound_webhooks_received", "received_at"),
)
