"""Data sinks: an outbox message's destination may be a configured sink instead of a webhook.

- ``deliveries.sink``: the sink's name (NULL: a webhook to ``url``, every message until now).

Revision ID: 0010
Revises: 0009 (API key names, expiry, roles)
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("sink", sa.String(64), nullable=True))


def downgrade() -> None:
    op.execute("DELETE FROM deliveries WHERE sink IS NOT NULL")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("sink")
