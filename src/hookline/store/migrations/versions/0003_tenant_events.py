"""Events by tenant, in insertion order: the tenant-wide stream (``GET /v1/events``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_events_tenant_id", "events", ["tenant", "id"])


def downgrade() -> None:
    op.drop_index("ix_events_tenant_id", table_name="events")
