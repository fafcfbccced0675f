"""API keys get limits of their own, and a job records the key that submitted it.

Revision ID: 0013
Revises: 0012 (tenant weights)
Create Date: 2026-12-12
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_LIMITED = (
    "max_concurrency IS NOT NULL OR requests_per_minute IS NOT NULL"
    " OR tokens_per_minute IS NOT NULL"
)


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("max_concurrency", sa.Integer, nullable=True))
        batch.add_column(sa.Column("requests_per_minute", sa.Integer, nullable=True))
        batch.add_column(sa.Column("tokens_per_minute", sa.Integer, nullable=True))
        batch.add_column(sa.Column("daily_token_budget", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("monthly_token_budget", sa.BigInteger, nullable=True))
    op.create_index(
        "ix_api_keys_limited",
        "api_keys",
        ["tenant"],
        sqlite_where=sa.text(_LIMITED),
        postgresql_where=sa.text(_LIMITED),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("key_id", sa.String(40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("key_id")
    op.drop_index("ix_api_keys_limited", table_name="api_keys")
    with op.batch_alter_table("api_keys") as batch:
        for column in (
            "monthly_token_budget",
            "daily_token_budget",
            "tokens_per_minute",
            "requests_per_minute",
            "max_concurrency",
        ):
            batch.drop_column(column)
