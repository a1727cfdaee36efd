"""Reliability of the async side under load: concurrent tasks with random failures and
cancellations keep the books balanced; a connection killed mid-scope commits nothing."""

from __future__ import annotations

import asyncio
import gc
import random
import warnings
from typing import Any

import pytest
from helpers import (
    FAILURE_POINTS,
    Injected,
    assert_books_match,
    checked_out,
    is_killed_connection_error,
    kill,
    random_transfer,
    server_pid,
    suppliers,
    transfer,
)
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from dbsession import DbSessionFactory, on_commit
from dbsession.asyncio import AsyncDbSessionFactory
from dbsession.example.models import Supplier

from .conftest import Run

TASKS = 8
TRANSFERS_PER_TASK = 100
FAILURES = (*FAILURE_POINTS, "cancelled")


@pytest.mark.slow
def test_concurrent_async_transfers_with_failures_and_cancellations_keep_the_books_balanced(
    ledger: DbSessionFactory,
    async_factory: AsyncDbSessionFactory,
    run: Run[Any],
    other_connection: Engine,
) -> None:
    committed: dict[str, tuple[int, int, int]] = {}
    failed: dict[str, str] = {}
    hooked: list[str] = []
    unexpected: list[BaseException] = []

    async def one_transfer(
        name: str, source: int, target: int, amount: int, fail_at: Any, held: asyncio.Event
    ) -> None:
        async with async_factory.session_scope() as session:
            on_commit(lambda: hooked.append(name))
            raise_at = None if fail_at == "cancelled" else fail_at
            await session.run_sync(transfer, name, source, target, amount, raise_at)
            if fail_at == "cancelled":
                held.set()
                await asyncio.Event().wait()  # held open, rows locked, until cancelled

    async def worker(number: int) -> None:
        rng = random.Random(number)
        for i in range(TRANSFERS_PER_TASK):
            name, source, target, amount, fail_at = random_transfer(rng, number, i, FAILURES)
            held = asyncio.Event()
            task = asyncio.create_task(one_transfer(name, source, target, amount, fail_at, held))
            if fail_at == "cancelled":  # with the rows flushed and locked, at a random moment
                await held.wait()
                await asyncio.sleep(rng.uniform(0, 0.01))
                task.cancel()
            await asyncio.wait({task})
            if task.cancelled():
                failed[name] = "cancelled"
            elif isinstance(task.exception(), Injected):
                failed[name] = "raised"
            elif task.exception() is not None:
                unexpected.append(task.exception())  # type: ignore[arg-type]
            else:
                committed[name] = (source, target, amount)

    async def body() -> None:
        await asyncio.gather(*(worker(n) for n in range(TASKS)))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(body())
        gc.collect()

    assert unexpected == []
    assert len(committed) + len(failed) == TASKS * TRANSFERS_PER_TASK
    assert {"cancelled", "raised"} <= set(failed.values())
    assert_books_match(other_connection, committed)
    assert sorted(hooked) == sorted(committed)  # once per committed transfer, never a failed one
    assert checked_out(async_factory) == 0
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


@pytest.mark.backends("postgresql", "mysql")
@pytest.mark.parametrize("then", ["commit", "next statement"])
def test_connection_killed_mid_async_scope_raises_commits_nothing_and_the_next_scope_works(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine, then: str
) -> None:
    async def body() -> OperationalError:
        with pytest.raises(OperationalError) as caught:
            async with async_factory.session_scope() as session:
                session.add(Supplier(name="lost"))
                await session.flush()
                kill(other_connection, [await session.run_sync(server_pid)])
                if then == "next statement":
                    await session.execute(text("SELECT 1"))
        assert checked_out(async_factory) == 0
        async with async_factory.session_scope() as session:
            session.add(Supplier(name="next"))
        return caught.value

    error = run(body())
    assert is_killed_connection_error(error)
    assert suppliers(other_connection) == ["next"]
    assert checked_out(async_factory) == 0


@pytest.mark.backends("postgresql", "mysql")
def test_an_idle_async_connection_killed_by_the_server_is_replaced_without_a_ping_per_checkout(
    async_factory: AsyncDbSessionFactory,
    run: Run[Any],
    other_connection: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The liveness check sees an async driver's connection end (aiomysql through asyncio's
    reader, psycopg through its socket): no ping while it is quiet, a new connection
    in place of a killed one."""
    dialect: Any = async_factory.engine.sync_engine.dialect
    real_ping = dialect.do_ping
    pings: list[bool] = []

    def do_ping(dbapi_connection: Any) -> bool:
        pings.append(bool(real_ping(dbapi_connection)))
        return pings[-1]

    monkeypatch.setattr(dialect, "do_ping", do_ping)

    async def body() -> None:
        for _ in range(5):
            async with async_factory.session_scope() as session:
                pid = await session.run_sync(server_pid)
        assert pings == []
        kill(other_connection, [pid])
        for _ in range(50):  # the server's close reaches the idle connection's reader
            await asyncio.sleep(0.02)
        async with async_factory.session_scope() as session:
            assert await session.run_sync(server_pid) != pid
            session.add(Supplier(name="after the kill"))

    run(body())
    assert suppliers(other_connection) == ["after the kill"]
    assert pings in ([], [False])  # at most the dead one's ping, never a live one's
