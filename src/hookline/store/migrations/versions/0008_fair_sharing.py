"""Fair sharing: lanes, tenants served by weight, and per-minute limits (hookline.fairness).

- ``jobs.lane`` (interactive, default, batch; existing jobs: default, and batch items batch),
  ``jobs.expected_tokens`` (reserved by a start under a token limit), ``jobs.input_tokens`` and
  ``jobs.output_tokens`` (the last attempt's usage).
- ``ix_jobs_claim`` now leads with lane and tenant: the claim finds the tenants with queued
  jobs in each lane of an upstream by a walk of the index, then reads each one's next jobs.
- ``fair_shares``: each tenant's virtual time per upstream and lane, and each lane's clock.
- ``usage_window``: the starts of the last minute under a per-minute limit.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lane", sa.String(16), nullable=False, server_default="default"))
        batch.add_column(sa.Column("expected_tokens", sa.Integer, nullable=True))
        batch.add_column(sa.Column("input_tokens", sa.Integer, nullable=True))
        batch.add_column(sa.Column("output_tokens", sa.Integer, nullable=True))
    op.execute("UPDATE jobs SET lane = 'batch' WHERE batch_id IS NOT NULL")
    op.drop_index("ix_jobs_claim", table_name="jobs")
    op.create_index(
        "ix_jobs_claim",
        "jobs",
        ["status", "upstream", "lane", "tenant", sa.text("priority DESC"), "id"],
    )
    op.create_table(
        "fair_shares",
        sa.Column("upstream", sa.String(64), primary_key=True),
        sa.Column("lane", sa.String(16), primary_key=True),
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("pass", sa.Float, nullable=False),
        sa.Column("credit", sa.Float, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "usage_window",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("scope", sa.String(80), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("started_at", sa.BigInteger, nullable=False),
        sa.Column("tokens", sa.Integer, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_usage_window_scope", "usage_window", ["scope", "started_at"])
    op.create_index("ix_usage_window_job", "usage_window", ["job_id", "attempt"])


def downgrade() -> None:
    op.drop_table("usage_window")
    op.drop_table("fair_shares")
    op.drop_index("ix_jobs_claim", table_name="jobs")
    op.create_index("ix_jobs_claim", "jobs", ["status", "upstream", sa.text("priority DESC"), "id"])
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("output_tokens")
        batch.drop_column("input_tokens")
        batch.drop_column("expected_tokens")
        batch.drop_column("lane")
