"""The SQL implementation of :class:`~hookline.store.base_keys.Keys`. Same Database as the jobs."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite

from hookline.store.base_keys import ApiKey, Keys
from hookline.store.database import Database
from hookline.store.schema import api_keys
from hookline.store.schema import tenants as tenant_rows

_COLUMNS = [api_keys.c[field.name] for field in dataclasses.fields(ApiKey)]


def _set_weight(conn: Connection, tenant: str, weight: float, now: int) -> None:
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(
        tenant_rows
    )
    conn.execute(
        insert.values(tenant=tenant, weight=weight, updated_at=now).on_conflict_do_update(
            index_elements=[tenant_rows.c.tenant],
            set_={"weight": insert.excluded.weight, "updated_at": insert.excluded.updated_at},
        )
    )


class SQLKeys(Keys):
    def __init__(self, database: Database) -> None:
        self.database = database
        self.capabilities = database.capabilities

    async def insert(self, key: ApiKey, key_hash: str, *, weight: float | None = None) -> None:
        # Only the columns set: the others keep their defaults (a schema a release behind,
        # before `hookline migrate`, has no column for what a key does not use).
        given = {name: value for name, value in dataclasses.asdict(key).items() if value}
        statement = sa.insert(api_keys).values(key_hash=key_hash, **given)

        def write(conn: Connection) -> None:
            conn.execute(statement)
            if weight is not None:
                _set_weight(conn, key.tenant, weight, key.created_at)

        await self.database.write(write)

    async def weights(self, tenants: Collection[str] | None = None) -> dict[str, float]:
        query = sa.select(tenant_rows.c.tenant, tenant_rows.c.weight)
        if tenants is not None:
            query = query.where(tenant_rows.c.tenant.in_(list(tenants)))

        def read(conn: Connection) -> dict[str, float]:
            return {str(tenant): float(weight) for tenant, weight in conn.execute(query)}

        return await self.database.read(read)

    async def _one(self, where: sa.ColumnElement[bool]) -> ApiKey | None:
        query = sa.select(*_COLUMNS).where(where)

        def read(conn: Connection) -> ApiKey | None:
            row = conn.execute(query).mappings().first()
            return None if row is None else ApiKey.from_row(row)

        return await self.database.read(read)

    async def find(self, key_hash: str) -> ApiKey | None:
        return await self._one(api_keys.c.key_hash == key_hash)

    async def get(self, key_id: str) -> ApiKey | None:
        return await self._one(api_keys.c.id == key_id)

    async def list(
        self, tenant: str | None = None, *, now: int, include_unusable: bool = False
    ) -> list[ApiKey]:
        query = sa.select(*_COLUMNS).order_by(api_keys.c.created_at, api_keys.c.id)
        if tenant is not None:
            query = query.where(api_keys.c.tenant == tenant)
        if not include_unusable:
            query = query.where(
                api_keys.c.revoked_at.is_(None),
                sa.or_(api_keys.c.expires_at.is_(None), api_keys.c.expires_at > now),
            )

        def read(conn: Connection) -> list[ApiKey]:
            return [ApiKey.from_row(row) for row in conn.execute(query).mappings()]

        return await self.database.read(read)

    async def revoke(self, key_id: str, now: int) -> bool:
        statement = (
            sa.update(api_keys)
            .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        revoked: int = await self.database.write(lambda conn: conn.execute(statement).rowcount)
        return revoked > 0

    async def touch(self, key_id: str, now: int) -> None:
        statement = (
            sa.update(api_keys)
            .where(
                api_keys.c.id == key_id,
                sa.or_(api_keys.c.last_used_at.is_(None), api_keys.c.last_used_at < now),
            )
            .values(last_used_at=now)
        )
        await self.database.write(lambda conn: conn.execute(statement))
