"""async_session_scope(): commit, rollback, close, under errors, cancellation and timeouts."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from helpers import checked_out, suppliers
from sqlalchemy import event, func, select, text
from sqlalchemy.engine import Engine

from dbsession import on_commit
from dbsession.asyncio import AsyncDbSessionFactory
from dbsession.example.models import Supplier

from .conftest import Run

# A statement that runs long enough to be cancelled while in flight. SQLite has no
# sleep: a recursive count that would take minutes unless interrupted.
SLOW_QUERY = {
    "postgresql": "SELECT pg_sleep(3)",
    "mysql": "SELECT SLEEP(3)",
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
    "WHERE x < 1000000000) SELECT count(*) FROM c",
}


def test_scope_commits_when_the_block_ends(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    async def body() -> None:
        async with async_factory.session_scope() as session:
            session.add(Supplier(name="ACME"))

    run(body())
    assert suppliers(other_connection) == ["ACME"]
    assert checked_out(async_factory) == 0


def test_error_rolls_back_everything_and_is_reraised_unchanged(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    error = LookupError("boom")

    async def body() -> None:
        async with async_factory.session_scope() as session:
            session.add(Supplier(name="flushed"))
            await session.flush()
            session.add(Supplier(name="pending"))
            raise error

    with pytest.raises(LookupError) as raised:
        run(body())
    assert raised.value is error
    assert suppliers(other_connection) == []
    assert checked_out(async_factory) == 0


def test_fifty_concurrent_units_of_work_persist_exactly_the_ones_that_did_not_raise(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    async def unit_of_work(number: int) -> None:
        async with async_factory.session_scope() as session:
            session.add(Supplier(name=f"supplier-{number:02}"))
            await session.flush()
            await asyncio.sleep(0)  # let the other tasks interleave mid-transaction
            if number % 3 == 0:
                raise ValueError(number)

    async def body() -> list[BaseException | None]:
        return await asyncio.gather(*(unit_of_work(n) for n in range(50)), return_exceptions=True)

    outcomes = run(body())
    failed = [n for n, outcome in enumerate(outcomes) if isinstance(outcome, ValueError)]
    assert failed == list(range(0, 50, 3))
    assert [o for o in outcomes if o is not None and not isinstance(o, ValueError)] == []
    expected = [f"supplier-{n:02}" for n in range(50) if n % 3 != 0]
    assert suppliers(other_connection) == expected
    assert checked_out(async_factory) == 0


@pytest.mark.parametrize("cancelled_in", ["a running query", "the code between queries"])
def test_cancelled_scope_leaves_nothing_and_returns_its_connection(
    cancelled_in: str,
    async_factory: AsyncDbSessionFactory,
    run: Run[Any],
    other_connection: Engine,
) -> None:
    slow_query = text(SLOW_QUERY[async_factory.url.get_backend_name()])

    async def body() -> None:
        in_flight = asyncio.Event()

        async def unit_of_work() -> None:
            async with async_factory.session_scope() as session:
                session.add(Supplier(name="never"))
                await session.flush()
                in_flight.set()
                if cancelled_in == "a running query":
                    await session.execute(slow_query)
                else:
                    await asyncio.Event().wait()

        task = asyncio.create_task(unit_of_work())
        await in_flight.wait()
        await asyncio.sleep(0.2)  # the slow statement is on the wire / in the driver
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=30)  # a liveness bound, not a speed target
        assert done, "the cancelled scope is still waiting for its statement to end"
        with pytest.raises(asyncio.CancelledError):
            await task
        assert checked_out(async_factory) == 0
        # The database is usable at once: no lock or transaction was left behind.
        async with async_factory.session_scope() as session:
            session.add(Supplier(name="after"))

    run(body())
    assert suppliers(other_connection) == ["after"]
    assert checked_out(async_factory) == 0


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in Python 3.11")
def test_timeout_rolls_back_and_raises_timeout_error(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    backend = async_factory.url.get_backend_name()

    async def body() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):  # type: ignore[attr-defined,unused-ignore]
                async with async_factory.session_scope() as session:
                    session.add(Supplier(name="too slow"))
                    await session.flush()
                    await session.execute(text(SLOW_QUERY[backend]))
        assert checked_out(async_factory) == 0

    run(body())
    assert suppliers(other_connection) == []


def test_failing_commit_rolls_back_and_raises_the_commit_error(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    from sqlalchemy.exc import IntegrityError

    async def body() -> None:
        async with async_factory.session_scope() as session:
            session.add(Supplier(name="twin"))
        with pytest.raises(IntegrityError):
            async with async_factory.session_scope() as session:
                session.add(Supplier(name="first of the batch"))
                session.add(Supplier(name="twin"))  # unique name: fails at commit's flush
        assert checked_out(async_factory) == 0

    run(body())
    assert suppliers(other_connection) == ["twin"]


def test_sessions_count_rows_like_plain_sqlalchemy(
    async_factory: AsyncDbSessionFactory, run: Run[Any]
) -> None:
    async def body() -> int:
        async with async_factory.session_scope() as session:
            session.add_all([Supplier(name="a"), Supplier(name="b")])
        async with async_factory.session_scope() as session:
            count: int = await session.scalar(select(func.count()).select_from(Supplier)) or 0
            return count

    assert run(body()) == 2


def test_a_cancellation_during_cleanup_waits_for_the_cleanup_then_is_raised(
    run: Run[Any],
) -> None:
    from dbsession._async_scope import run_to_completion

    async def body() -> list[str]:
        steps: list[str] = []
        release = asyncio.Event()

        async def cleanup() -> None:
            await release.wait()
            steps.append("connection returned")

        async def scope_exit() -> None:
            await run_to_completion(cleanup())
            steps.append("not reached")

        task = asyncio.create_task(scope_exit())
        await asyncio.sleep(0)
        task.cancel()  # e.g. a second cancellation while the rollback runs
        await asyncio.sleep(0)
        assert not task.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        return steps

    assert run(body()) == ["connection returned"]


def announced(run: Run[Any], body: Callable[[], Coroutine[Any, Any, None]]) -> list[str]:
    """Run ``body()`` with an ``after_insert`` event that registers, with ``on_commit()``,
    a hook naming the inserted supplier; return the names the hooks that ran gave."""
    ran: list[str] = []

    def announce(mapper: object, connection: object, target: Supplier) -> None:
        on_commit(lambda: ran.append(target.name))

    event.listen(Supplier, "after_insert", announce)
    try:
        run(body())
    finally:
        event.remove(Supplier, "after_insert", announce)
    return ran


def test_a_hook_registered_by_an_orm_event_of_the_final_flush_runs_after_the_commit(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    """The scope commits in a task of its own (run to completion), where it was not
    visible: ``on_commit()`` from an ``after_insert`` event raised NoActiveScopeError and
    the unit rolled back."""

    async def body() -> None:
        async with async_factory.session_scope() as session:
            session.add(Supplier(name="late"))

    assert announced(run, body) == ["late"] and suppliers(other_connection) == ["late"]


def test_a_hook_registered_by_an_orm_event_of_a_joined_scopes_flush_is_the_joined_scopes(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    """A joined scope's SAVEPOINT is released in a task of its own too: ``on_commit()``
    from its closing flush raised NoActiveScopeError there. The hook belongs to the joined
    scope: it runs after the outer commit, and goes when the joined scope rolls back."""

    async def body() -> None:
        async with async_factory.session_scope() as session:
            async with async_factory.session_scope() as joined:
                joined.add(Supplier(name="kept"))
            with pytest.raises(RuntimeError):
                async with async_factory.session_scope() as joined:
                    joined.add(Supplier(name="undone"))
                    await joined.flush()
                    raise RuntimeError("roll the joined scope back")
            session.add(Supplier(name="outer"))

    assert sorted(announced(run, body)) == ["kept", "outer"]
    assert sorted(suppliers(other_connection)) == ["kept", "outer"]
