"""Issue 12, async side: a scope is used only by the task that owns it.

Child tasks (``asyncio.create_task``), ``asyncio.to_thread`` and async generators that
yield inside a scope never join it, and after it ended they cannot register hooks on
it; a session is dead after its scope; objects loaded in a read-only scope stay
readable; the hooks of a committed transaction run when the task is cancelled while
the session closes.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncSession

from dbsession import NoActiveScopeError, on_commit
from dbsession.asyncio import AsyncDbSessionFactory, async_current_session
from dbsession.example.models import Supplier

from .conftest import Run


def names(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(text("SELECT name FROM supplier")))


def checked_out(factory: AsyncDbSessionFactory) -> int:
    count: int = factory.engine.pool.checkedout()  # type: ignore[attr-defined]
    return count


def assert_no_visible_scope() -> None:
    with pytest.raises(NoActiveScopeError):
        async_current_session()
    with pytest.raises(NoActiveScopeError):
        on_commit(lambda: None)


def test_a_child_task_never_joins_its_parents_scope_nor_its_hooks_after_it(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    hooks: list[str] = []
    sqlite = async_factory.url.get_backend_name() == "sqlite"

    async def child(parent: AsyncSession, started: asyncio.Event, go: asyncio.Event) -> None:
        assert_no_visible_scope()
        started.set()
        await go.wait()  # the parent's scope has ended by now
        assert_no_visible_scope()
        async with async_factory.session_scope() as own:
            assert own is not parent
            own.add(Supplier(name="child"))
            on_commit(lambda: hooks.append("child"))

    async def body() -> None:
        started, go = asyncio.Event(), asyncio.Event()
        async with async_factory.session_scope() as session:
            task = asyncio.create_task(child(session, started, go))
            await started.wait()
            session.add(Supplier(name="parent"))
            on_commit(lambda: hooks.append("parent"))
        go.set()
        await task
        async with async_factory.session_scope() as later:  # SQLite: nothing holds the lock
            later.add(Supplier(name="later"))

    run(body())
    assert hooks == ["parent", "child"]
    assert names(other_connection) == {"parent", "child", "later"}
    assert checked_out(async_factory) == 0 or not sqlite


def test_to_thread_and_a_copied_context_never_join_the_scope(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    async def body() -> None:
        async with async_factory.session_scope() as session:
            await asyncio.to_thread(assert_no_visible_scope)
            copied = contextvars.copy_context()
            session.add(Supplier(name="parent"))
        copied.run(assert_no_visible_scope)
        await asyncio.to_thread(assert_no_visible_scope)
        async with async_factory.session_scope() as later:
            assert later is not session
            later.add(Supplier(name="later"))

    run(body())
    assert names(other_connection) == {"parent", "later"}


def test_an_async_generator_yielding_inside_a_scope_does_not_lend_it_to_its_consumer(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    async def rows(sessions: list[AsyncSession]) -> AsyncGenerator[int, None]:
        async with async_factory.session_scope() as session:
            sessions.append(session)
            yield 1
            assert async_current_session() is session
            yield 2

    async def body() -> None:
        sessions: list[AsyncSession] = []
        iterator = rows(sessions)
        await anext(iterator)
        assert_no_visible_scope()
        async with async_factory.session_scope() as mine:
            assert mine is not sessions[0]
            mine.add(Supplier(name="consumer"))
        await anext(iterator)
        await iterator.aclose()  # early stop
        assert checked_out(async_factory) == 0

    run(body())
    assert names(other_connection) == {"consumer"}


def test_using_the_session_after_its_scope_raises(
    async_factory: AsyncDbSessionFactory, run: Run[Any]
) -> None:
    async def body() -> None:
        async with async_factory.session_scope() as session:
            session.add(Supplier(name="kept"))
        with pytest.raises(InvalidRequestError, match="closed"):
            await session.execute(select(Supplier))
        assert checked_out(async_factory) == 0
        async with async_factory.session_scope() as other:
            other.add(Supplier(name="next"))

    run(body())


@pytest.mark.parametrize("readonly", [False, True])
def test_objects_loaded_in_a_scope_stay_readable_after_it(
    async_factory: AsyncDbSessionFactory, run: Run[Any], readonly: bool
) -> None:
    async def body() -> Supplier:
        async with async_factory.session_scope() as session:
            session.add(Supplier(name="acme"))
        async with async_factory.session_scope(readonly=readonly) as session:
            supplier = (await session.scalars(select(Supplier))).one()
        return supplier

    supplier = run(body())
    assert supplier.name == "acme"
    assert supplier.id is not None


def test_hooks_of_a_commit_run_when_the_task_is_cancelled_while_the_session_closes(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    hooks: list[str] = []

    async def unit(me: asyncio.Future[None]) -> None:
        async with async_factory.session_scope() as session:
            session.add(Supplier(name="committed"))
            on_commit(lambda: hooks.append("sent"))
            # The cancellation is asked for the moment the database has committed: it
            # lands in whatever the scope awaits next (returning the connection, closing).
            event.listen(session.sync_session, "after_commit", lambda _: me.cancel())

    async def body_with_self() -> None:
        holder: list[asyncio.Task[None]] = []

        async def unit_of_self() -> None:
            await asyncio.sleep(0)
            await unit(holder[0])

        holder.append(asyncio.create_task(unit_of_self()))
        with pytest.raises(asyncio.CancelledError):
            await holder[0]
        assert checked_out(async_factory) == 0

    run(body_with_self())
    assert names(other_connection) == {"committed"}
    assert hooks == ["sent"]
