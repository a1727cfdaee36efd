"""bulk_insert on the async side stores what insert() stores, and a read-only scope
refuses it with ReadOnlyError (on PostgreSQL, COPY's own error through psycopg's async
connection)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Column, MetaData, Table, Text, func, select, text

from dbsession import ReadOnlyError
from dbsession._bulk import bulk_insert
from dbsession.asyncio import AsyncDbSessionFactory
from dbsession.example.models import Supplier

from .conftest import Run

WIDE = Table("wide", MetaData(), Column("body", Text))


def test_async_read_only_scope_refuses_bulk_insert(
    async_factory: AsyncDbSessionFactory, run: Run[Any]
) -> None:
    async def body() -> int:
        with pytest.raises(ReadOnlyError):
            async with async_factory.session_scope(readonly=True) as session:
                await session.run_sync(bulk_insert, Supplier, [{"name": "x"}])
        async with async_factory.session_scope(readonly=True) as session:
            return int(await session.scalar(select(func.count()).select_from(Supplier)) or 0)

    assert run(body()) == 0


@pytest.mark.backends("mysql")
def test_async_pages_fit_max_allowed_packet(
    async_factory: AsyncDbSessionFactory, run: Run[Any]
) -> None:
    """1,000 rows of 20 KB, over the server's max_allowed_packet in one statement."""

    async def body() -> tuple[int, int]:
        async with async_factory.session_scope() as session:
            await session.execute(text("CREATE TABLE wide (body LONGTEXT)"))
        try:
            async with async_factory.session_scope() as session:
                packet = int(await session.scalar(text("SELECT @@max_allowed_packet")) or 0)
                big = [{"body": "y" * 20_000} for _ in range(1000)]
                await session.run_sync(bulk_insert, WIDE, big)
            async with async_factory.session_scope(readonly=True) as session:
                count = int(await session.scalar(text("SELECT COUNT(*) FROM wide")) or 0)
            return packet, count
        finally:
            async with async_factory.session_scope() as session:
                await session.execute(text("DROP TABLE wide"))

    packet, count = run(body())
    assert 1000 * 20_000 > packet
    assert count == 1000
