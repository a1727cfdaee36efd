"""Issue 24, async side: a scope never reports a commit that did not happen.

A database error caught inside an async scope makes it refuse to commit
(NeedsRollbackError) on every backend, a joined scope around the optional statement
keeps the rest; ``await session.commit()`` inside a scope only flushes and
``await session.rollback()`` dooms the unit.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from helpers import rename_first
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, PendingRollbackError

from dbsession import NeedsRollbackError, on_commit
from dbsession.asyncio import AsyncDbSessionFactory
from dbsession.example.models import Supplier

from .conftest import Run

DUPLICATE = text("INSERT INTO supplier (name) VALUES ('first')")


def names(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(text("SELECT name FROM supplier")))


def checked_out(factory: AsyncDbSessionFactory) -> int:
    count: int = factory.engine.pool.checkedout()  # type: ignore[attr-defined]
    return count


@pytest.fixture
def one_supplier(async_factory: AsyncDbSessionFactory, run: Run[Any]) -> AsyncDbSessionFactory:
    """The factory, with supplier 'first' already there (the optional insert collides)."""

    async def add() -> None:
        async with async_factory.session_scope() as session:
            session.add(Supplier(name="first"))

    run(add())
    return async_factory


def test_a_caught_integrity_error_makes_the_scope_refuse_to_commit(
    one_supplier: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    hooks: list[str] = []

    async def body() -> None:
        async with one_supplier.session_scope() as session:
            session.add(Supplier(name="kept?"))
            await session.flush()
            try:
                await session.execute(DUPLICATE)
            except IntegrityError:
                pass
            on_commit(lambda: hooks.append("sent"))

    with pytest.raises(NeedsRollbackError, match="caught inside the scope") as raised:
        run(body())
    assert isinstance(raised.value.__cause__, IntegrityError)
    assert isinstance(raised.value, PendingRollbackError)
    assert hooks == []
    assert names(other_connection) == {"first"}
    assert checked_out(one_supplier) == 0


def test_a_joined_scope_around_the_optional_statement_keeps_the_rest(
    one_supplier: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    hooks: list[str] = []

    async def body() -> None:
        async with one_supplier.session_scope() as session:
            session.add(Supplier(name="kept"))
            await session.flush()
            try:
                async with one_supplier.session_scope():
                    await session.execute(DUPLICATE)
            except IntegrityError:
                pass
            with pytest.raises(NeedsRollbackError, match="joined scope"):
                async with one_supplier.session_scope() as inner:
                    try:
                        await inner.execute(DUPLICATE)
                    except IntegrityError:
                        pass
            session.add(Supplier(name="after"))
            on_commit(lambda: hooks.append("sent"))

    run(body())
    assert names(other_connection) == {"first", "kept", "after"}
    assert hooks == ["sent"]


def test_session_commit_inside_a_scope_only_flushes(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    async def standalone() -> None:
        async with async_factory.session_scope() as session:
            session.add(Supplier(name="half"))
            await session.commit()
            raise RuntimeError("payment declined")

    async def joined() -> None:
        async with async_factory.session_scope() as session:
            session.add(Supplier(name="outer"))
            async with async_factory.session_scope() as inner:
                inner.add(Supplier(name="inner"))
                await inner.commit()
            raise RuntimeError("outer fails")

    for body in (standalone, joined):
        with pytest.raises(RuntimeError):
            run(body())
    assert names(other_connection) == set()


def test_session_rollback_inside_a_scope_dooms_the_unit(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    hooks: list[str] = []

    async def body() -> None:
        async with async_factory.session_scope() as session:
            session.add(Supplier(name="before"))
            await session.flush()
            await session.rollback()
            session.add(Supplier(name="after"))
            on_commit(lambda: hooks.append("sent"))

    with pytest.raises(NeedsRollbackError, match=r"session\.rollback\(\)"):
        run(body())
    assert names(other_connection) == set()
    assert hooks == []
    assert checked_out(async_factory) == 0


# --- the pool's reset after a COMMIT: whatever is left open is rolled back -------------


@pytest.mark.backends("postgresql", "mysql")
def test_a_failed_first_statement_after_a_commit_is_rolled_back(
    one_supplier: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    async def fail() -> None:
        async with one_supplier.session_scope() as session:
            await session.execute(DUPLICATE)  # MariaDB keeps a lock on the duplicate key

    with pytest.raises(IntegrityError):
        run(fail())
    rename_first(other_connection)  # the lock was released: the transaction ended
    assert names(other_connection) == {"renamed"}


@pytest.mark.backends("postgresql")
def test_a_caught_failure_on_the_drivers_own_connection_is_not_reported_committed(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    """The async twin of the sync test: psycopg's COMMIT of an aborted transaction rolls
    back without an error, and the unit reported a commit."""
    hooks: list[str] = []

    async def body() -> None:
        async with async_factory.session_scope() as session:
            session.add(Supplier(name="lost"))
            await session.flush()
            on_commit(lambda: hooks.append("sent"))
            raw = await (await session.connection()).get_raw_connection()
            cursor = raw.driver_connection.cursor()  # type: ignore[union-attr]
            with pytest.raises(psycopg.errors.DivisionByZero):
                await cursor.execute("SELECT 1/0")

    with pytest.raises(NeedsRollbackError, match="driver's own connection"):
        run(body())
    assert names(other_connection) == set() and hooks == []
    assert checked_out(async_factory) == 0
