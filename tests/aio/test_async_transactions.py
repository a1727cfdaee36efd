"""The async twins of the transactions features: nested scopes, async_current_session,
on_commit, read-only scopes and the replica, isolation levels, run_in_transaction."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    BASE,
    CAP,
    THREE,
    checked_out,
    released_on_first_retry,
    retries,
    statements,
    value,
)
from helpers import FIVE as FAST
from helpers import suppliers as names
from sqlalchemy import select, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dbsession import (
    NoActiveScopeError,
    ReadOnlyError,
    RetryExhaustedError,
    RetryPolicy,
    current_session,
    on_commit,
)
from dbsession.asyncio import (
    AsyncDbSessionFactory,
    async_current_session,
    async_default_factory,
    async_run_in_transaction,
    async_session_scope,
)
from dbsession.errors import ScopeError, UnsupportedIsolationLevelError
from dbsession.example.models import Base, Supplier

from .conftest import Run, bare

# --- nested scopes, async_current_session, on_commit ------------------------------------


def test_nested_scope_is_a_savepoint_rolled_back_alone(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    async def body() -> None:
        async with async_factory.session_scope() as outer:
            outer.add(Supplier(name="outer"))
            with pytest.raises(LookupError):
                async with async_factory.session_scope() as inner:
                    assert inner is outer
                    inner.add(Supplier(name="rolled back"))
                    await inner.flush()
                    raise LookupError
            async with async_factory.session_scope() as inner:
                inner.add(Supplier(name="kept"))

    run(body())
    assert names(other_connection) == ["kept", "outer"]
    assert checked_out(async_factory) == 0


def test_nested_scope_outside_any_scope_is_a_normal_scope(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    async def body() -> None:
        async with async_factory.session_scope() as session:
            session.add(Supplier(name="alone"))

    run(body())
    assert names(other_connection) == ["alone"]


def test_joined_scope_shares_the_outer_transaction_and_cannot_change_its_level(
    async_factory: AsyncDbSessionFactory, run: Run[Any]
) -> None:
    async def body() -> None:
        async with async_factory.session_scope() as outer:
            async with async_factory.session_scope(readonly=True) as reader:
                assert reader is outer
            with pytest.raises(ScopeError):
                async_factory.session_scope(isolation_level="SERIALIZABLE")

    run(body())


def test_async_current_session_is_the_innermost_scopes_per_task(
    async_factory: AsyncDbSessionFactory, run: Run[Any]
) -> None:
    async def in_task(number: int) -> bool:
        async with async_factory.session_scope() as session:
            await asyncio.sleep(0)  # the other tasks open their scopes meanwhile
            return async_current_session() is session

    async def body() -> None:
        with pytest.raises(NoActiveScopeError, match="outside any"):
            async_current_session()
        async with async_factory.session_scope() as session:
            assert async_current_session() is session
            with pytest.raises(NoActiveScopeError, match="async_current_session"):
                current_session()
            assert await asyncio.gather(*(in_task(n) for n in range(5))) == [True] * 5
            assert async_current_session() is session

    run(body())


def test_on_commit_runs_after_the_commit_and_is_dropped_on_rollback(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    ran: list[str] = []

    async def body() -> None:
        async with async_factory.session_scope() as session:
            session.add(Supplier(name="committed"))
            on_commit(lambda: ran.append(f"outer saw {names(other_connection)}"))
            with pytest.raises(LookupError):
                async with async_factory.session_scope():
                    on_commit(lambda: ran.append("savepoint rolled back"))
                    raise LookupError
            async with async_factory.session_scope():
                on_commit(lambda: ran.append("savepoint released"))
            assert ran == []
        with pytest.raises(LookupError):
            async with async_factory.session_scope():
                on_commit(lambda: ran.append("rolled back"))
                raise LookupError

    run(body())
    assert ran == ["outer saw ['committed']", "savepoint released"]


# --- read-only scopes, the replica, isolation levels ------------------------------------


def test_write_in_a_read_only_scope_is_a_read_only_error(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    async def body() -> None:
        with pytest.raises(ReadOnlyError):
            async with async_factory.session_scope(readonly=True) as session:
                session.add(Supplier(name="refused"))
        with pytest.raises(ReadOnlyError):
            async with async_factory.session_scope(readonly=True) as session:
                await session.execute(text("INSERT INTO supplier (name) VALUES ('refused')"))
        async with async_factory.session_scope() as session:  # writable again
            session.add(Supplier(name="written"))
        async with async_factory.session_scope(readonly=True) as session:
            assert await session.scalar(select(Supplier.name)) == "written"

    run(body())
    assert names(other_connection) == ["written"]
    assert checked_out(async_factory) == 0


def test_replica_serves_read_only_scopes_and_the_primary_the_rest(
    async_factory: AsyncDbSessionFactory, backend_url: URL, run: Run[Any]
) -> None:
    routed = AsyncDbSessionFactory(bare(backend_url), replica_url=bare(backend_url))

    async def body() -> None:
        try:
            assert routed.replica_engine is not None
            assert routed.replica_engine is not routed.engine
            on_primary = statements(routed.engine.sync_engine)
            on_replica = statements(routed.replica_engine.sync_engine)
            async with routed.session_scope() as session:
                session.add(Supplier(name="via primary"))
            async with routed.session_scope(readonly=True) as session:
                found = await session.scalar(text("SELECT name FROM supplier /* replica */"))
                assert found == "via primary"
            assert any("INSERT" in s for s in on_primary)
            assert any("/* replica */" in s for s in on_replica)
            assert not any("/* replica */" in s for s in on_primary)
            assert not any("INSERT" in s for s in on_replica)
        finally:
            await routed.dispose()

    run(body())


def test_isolation_level_applies_to_the_scope(
    async_factory: AsyncDbSessionFactory, run: Run[Any]
) -> None:
    async def level(session: AsyncSession) -> str:
        connection = await session.connection()
        return str(await connection.get_isolation_level())

    async def body() -> None:
        async with async_factory.session_scope(isolation_level="serializable") as session:
            assert await level(session) == "SERIALIZABLE"
            session.add(Supplier(name="serial"))
        with pytest.raises(UnsupportedIsolationLevelError, match="CHAOS"):
            async_factory.session_scope(isolation_level="CHAOS")

    run(body())


# --- run_in_transaction ------------------------------------------------------------------


@pytest.mark.usefixtures("counters")
def test_serializable_increments_from_many_tasks_all_land(
    async_factory: AsyncDbSessionFactory,
    other_connection: Engine,
    run: Run[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dbsession")
    hooks: list[int] = []

    async def increment(session: AsyncSession, number: int) -> int:
        current = await session.scalar(text("SELECT value FROM counter WHERE id = 1"))
        await asyncio.sleep(0)  # the other tasks read the same value meanwhile
        await session.execute(
            text("UPDATE counter SET value = :v WHERE id = 1"), {"v": current + 1}
        )
        on_commit(lambda: hooks.append(number))
        return number

    async def worker(task: int) -> None:
        for step in range(15):
            number = task * 100 + step
            serializable = async_factory.transactional(
                retry=RetryPolicy(attempts=200, base_delay=BASE, max_delay=CAP),
                isolation_level="SERIALIZABLE",
            )
            done = await serializable(increment)(number)
            assert done == number

    async def body() -> None:
        await asyncio.gather(*(worker(task) for task in range(4)))

    run(body())
    assert value(other_connection) == 60
    assert len(hooks) == 60 and len(set(hooks)) == 60  # once per successful attempt
    expected = {"postgresql": "SQLSTATE 40001", "mysql": "1213 deadlock"}
    backend = async_factory.url.get_backend_name()
    if backend in expected:  # SQLite's BEGIN IMMEDIATE queues writers: nothing to retry
        assert any(expected[backend] in line for line in retries(caplog))
    assert checked_out(async_factory) == 0


@pytest.mark.usefixtures("counters")
@pytest.mark.backends("postgresql", "mysql")  # SQLite's BEGIN IMMEDIATE queues writers
def test_deadlock_between_two_tasks_is_retried_and_both_complete(
    async_factory: AsyncDbSessionFactory,
    other_connection: Engine,
    run: Run[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dbsession")
    completed: list[str] = []

    async def body() -> None:
        holding: list[int] = []
        both_hold_one_row = asyncio.Event()

        async def cross(session: AsyncSession, first: int, second: int) -> None:
            update = text("UPDATE counter SET value = value + 1 WHERE id = :id")
            await session.execute(update, {"id": first})
            holding.append(first)
            if len(holding) == 2:
                both_hold_one_row.set()
            await asyncio.wait_for(both_hold_one_row.wait(), timeout=10)
            await session.execute(update, {"id": second})
            on_commit(lambda: completed.append(f"{first}->{second}"))

        await asyncio.gather(
            *(async_factory.transactional(retry=FAST)(cross)(a, b) for a, b in [(1, 2), (2, 1)])
        )

    run(body())
    assert sorted(completed) == ["1->2", "2->1"]
    assert value(other_connection, 1) == 2 and value(other_connection, 2) == 2
    logged = retries(caplog)
    assert len(logged) == 1
    assert ("1213 deadlock" in logged[0]) or ("SQLSTATE 40P01" in logged[0])


def test_sqlite_busy_is_retried_until_the_lock_is_released(
    tmp_path: Path, run: Run[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dbsession")
    path = tmp_path / "busy.sqlite3"
    made = AsyncDbSessionFactory(f"sqlite:///{path}", sqlite_busy_timeout=0)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")

    async def add(session: AsyncSession) -> str:
        await session.execute(text("CREATE TABLE IF NOT EXISTS t (name TEXT)"))
        return "done"

    async def body() -> str:
        try:
            return await made.transactional(retry=THREE)(add)()
        finally:
            await made.dispose()

    try:
        with released_on_first_retry(holder.rollback):
            assert run(body()) == "done"
    finally:
        holder.close()
    logged = retries(caplog)
    assert len(logged) == 1 and "SQLITE_BUSY" in logged[0]


def test_retry_exhausted_and_other_errors_are_not_retried(
    async_factory: AsyncDbSessionFactory, tmp_path: Path, run: Run[Any]
) -> None:
    calls = 0

    async def duplicate(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        session.add_all([Supplier(name="dup"), Supplier(name="dup")])

    async def body() -> None:
        with pytest.raises(IntegrityError):
            await async_factory.transactional(retry=RetryPolicy(attempts=5))(duplicate)()
        assert calls == 1

    run(body())
    path = tmp_path / "locked.sqlite3"
    locked = AsyncDbSessionFactory(f"sqlite:///{path}", sqlite_busy_timeout=0)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")

    async def exhausted() -> None:
        try:
            with pytest.raises(RetryExhaustedError, match="on each of 3 attempts") as caught:
                await locked.transactional(retry=THREE)(duplicate)()
            assert caught.value.attempts == 3
        finally:
            await locked.dispose()

    try:
        run(exhausted())
    finally:
        holder.close()
    assert calls == 4


def test_module_functions_use_the_default_async_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run[Any]
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/default.sqlite3")

    async def add(session: AsyncSession, name: str) -> str:
        session.add(Supplier(name=name))
        return name

    async def body() -> list[str]:
        await async_default_factory().create_all(Base.metadata)
        assert await async_run_in_transaction(add, "one") == "one"
        async with async_session_scope(readonly=True) as session:
            return list(await session.scalars(select(Supplier.name)))

    assert run(body()) == ["one"]
