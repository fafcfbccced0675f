"""The W3C trace context of a job's submission, kept with the job and its webhook messages.

With tracing on, a job carries the ``traceparent`` of the request that submitted it across the
queue to the worker that runs it, and each message reporting its events carries it to the
receiver, so one trace shows submit, queue, upstream call and delivery. Null with tracing off.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("traceparent", sa.String(64), nullable=True))
    op.add_column("deliveries", sa.Column("traceparent", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("traceparent")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("traceparent")
