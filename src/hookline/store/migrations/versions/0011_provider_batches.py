"""Asynchronous upstreams: provider batches and the inbound webhooks seen.

- ``batches.provider_upstreams``: the upstreams whose items run as provider batches.
- ``provider_batches``: one row per provider batch (a part of a hookline batch's items).
- ``inbound_webhooks``: the webhook-ids received from each upstream, to refuse replays.

Revision ID: 0011
Revises: 0010 (data sinks)
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("provider_upstreams", JSONType, nullable=True))
    op.create_table(
        "provider_batches",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("batch_id", sa.String(40), nullable=False),
        sa.Column("part", sa.Integer, nullable=False),
        sa.Column("upstream", sa.String(64), nullable=False),
        sa.Column("first_line", sa.Integer, nullable=False),
        sa.Column("last_line", sa.Integer, nullable=False),
        sa.Column("requests", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("provider_status", sa.String(32), nullable=True),
        sa.Column("provider_batch_id", sa.String(128), nullable=True),
        sa.Column("provider_file_id", sa.String(128), nullable=True),
        sa.Column("output_file_id", sa.String(128), nullable=True),
        sa.Column("error_file_id", sa.String(128), nullable=True),
        sa.Column("results_url", sa.String(2048), nullable=True),
        sa.Column("completed", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("errors", JSONType, nullable=True),
        sa.Column("stop", sa.String(16), nullable=True),
        sa.Column("stop_sent", sa.Boolean, nullable=False),
        sa.Column("creating_at", sa.BigInteger, nullable=True),
        sa.Column("next_poll_at", sa.BigInteger, nullable=False),
        sa.Column("poll_ms", sa.Integer, nullable=False),
        sa.Column("polls", sa.Integer, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_provider_batches_batch", "provider_batches", ["batch_id", "part"])
    op.create_index(
        "ix_provider_batches_provider", "provider_batches", ["upstream", "provider_batch_id"]
    )
    op.create_table(
        "inbound_webhooks",
        sa.Column("upstream", sa.String(64), primary_key=True),
        sa.Column("webhook_id", sa.String(256), primary_key=True),
        sa.Column("received_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_inbound_webhooks_received", "inbound_webhooks", ["received_at"])


def downgrade() -> None:
    op.drop_table("inbound_webhooks")
    op.drop_table("provider_batches")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("provider_upstreams")
