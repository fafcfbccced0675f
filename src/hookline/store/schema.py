"""The database schema as SQLAlchemy Core tables. Migrations under ``hookline/migrations`` create it;
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

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("revoked_at", sa.BigInteger, nullable=True),
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
    # The claim query: next runnable job of one upstream, highest priority first, then FIFO.
    sa.Index("ix_jobs_claim", "status", "upstream", sa.desc("priority"), "id"),
    sa.Index("ix_jobs_tenant_id", "tenant", "id"),
    sa.Index(
        "ix_jobs_running_lease",
        "lease_expires_at",
        sqlite_where=sa.text("status = 'running'"),
        postgresql_where=sa.text("status = 'running'"),
    ),
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
    sa.UniqueConstraint("job_id", "seq", name="uq_events_job_seq"),
    sqlite_autoincrement=True,
)
