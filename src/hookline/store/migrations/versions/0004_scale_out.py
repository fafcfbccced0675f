"""Many processes on one database: order that does not depend on their clocks, and retention.

- ``deliveries.seq``: the per-job sequence number of the event a message reports. A job's
  messages to one destination are sent in ``(seq, id)`` order; message ids come from the clock of
  whichever process wrote them, which need not agree with the others'.
- ``events.txid`` (PostgreSQL): the writing transaction's id. Event ids are taken at insert, so
  concurrent transactions may commit them out of order; the tenant stream reads only events of
  transactions older than every transaction still running, and so never steps past one that is
  about to appear.
- ``upstream_rates``: the token bucket of each rate-limited upstream, shared by all workers.
- Indexes for retention: finished jobs and settled messages, oldest first.

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
    op.create_table(
        "upstream_rates",
        sa.Column("upstream", sa.String(64), primary_key=True),
        sa.Column("tokens", sa.Float, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("seq", sa.Integer, nullable=False, server_default="0"))
    op.drop_index("ix_deliveries_order", table_name="deliveries")
    op.create_index("ix_deliveries_order", "deliveries", ["order_key", "status", "seq", "id"])
    postgres = op.get_bind().dialect.name == "postgresql"
    default = sa.text("(pg_current_xact_id()::text::bigint)") if postgres else None
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("txid", sa.BigInteger, nullable=True, server_default=default))
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
    with op.batch_alter_table("events") as batch:
        batch.drop_column("txid")
    op.drop_index("ix_deliveries_order", table_name="deliveries")
    op.create_index("ix_deliveries_order", "deliveries", ["order_key", "status", "id"])
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("seq")
    op.drop_table("upstream_rates")
