"""Indexes for retention: finished jobs and settled webhook messages, oldest first.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    finished = sa.text("finished_at IS NOT NULL")
    op.create_index(
        "ix_jobs_finished",
        "jobs",
        ["finished_at"],
        sqlite_where=finished,
        postgresql_where=finished,
    )
    settled = sa.text("status <> 'pending'")
    op.create_index(
        "ix_deliveries_settled",
        "deliveries",
        ["updated_at"],
        sqlite_where=settled,
        postgresql_where=settled,
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_settled", table_name="deliveries")
    op.drop_index("ix_jobs_finished", table_name="jobs")
