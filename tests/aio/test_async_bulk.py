"""bulk_insert on the async side, through AsyncSession.run_sync."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.engine import Engine
from test_bulk import ITEM, awkward_rows, metadata, stored

from dbsession._bulk import bulk_insert
from dbsession._errors import BulkInsertError
from dbsession.asyncio import AsyncDbSessionFactory

from .conftest import Run


def test_async_bulk_insert_commits_and_refuses_with_the_scope(
    async_factory: AsyncDbSessionFactory, other_connection: Engine, run: Run[Any]
) -> None:
    # No bytes: aiomysql itself fails to escape them with this PyMySQL (TypeError in its
    # escape(), whatever sends them); the sync tests cover bytes on every backend.
    rows = [
        {key: value for key, value in row.items() if key != "blob"} for row in awkward_rows(1200)
    ]
    bad = [*rows, {**rows[0], "name": None}]

    async def body() -> None:
        async with async_factory.engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
        try:
            async with async_factory.session_scope() as session:
                assert await session.run_sync(bulk_insert, ITEM, rows) == 1200
                with pytest.raises(BulkInsertError):
                    await session.run_sync(bulk_insert, ITEM, bad)
            assert len(stored(other_connection, ITEM)) == 1200
        finally:
            async with async_factory.engine.begin() as connection:
                await connection.run_sync(metadata.drop_all)

    run(body())
