"""Alembic environment: runs on the connection hookline hands over (see ``hookline.store.migrate``)."""

from __future__ import annotations

from alembic import context

from hookline.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `hookline migrate`, which supplies the connection")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
