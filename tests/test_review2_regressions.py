"""Regressions from a review of cf0aa49, f6a492c and 94da0ec."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL

from dbsession import DbSessionFactory
from dbsession.asyncio import AsyncDbSessionFactory
from dbsession.errors import PoolExhaustedError


@pytest.mark.backends("postgresql", "mysql")
def test_holder_named_after_the_connection_was_reopened_at_checkout(backend_url: URL) -> None:
    """SQLAlchemy clears record.info when a record reconnects after _do_get: the holder
    kept there was lost and the error said 'outside any unit of work'."""
    factory = DbSessionFactory(backend_url, pool_size=1, max_overflow=0, pool_timeout=0.3)
    try:
        with factory.engine.connect() as connection:
            connection.invalidate()  # the next checkout reopens the same record
        held, release = threading.Event(), threading.Event()

        def holder_unit() -> None:
            with factory.session_scope() as session:
                session.execute(text("SELECT 1"))
                held.set()
                release.wait(10)

        holder = threading.Thread(target=holder_unit)
        holder.start()
        try:
            assert held.wait(10)
            with pytest.raises(PoolExhaustedError) as caught:
                with factory.session_scope() as session:
                    session.execute(text("SELECT 1"))
        finally:
            release.set()
            holder.join()
        assert "outside any unit of work" not in str(caught.value)
        assert __file__ in str(caught.value)
    finally:
        factory.dispose()


@pytest.mark.backends("postgresql")
@pytest.mark.parametrize("state", ["two-phase", "transaction-block"])
def test_a_psycopg_block_left_open_with_libpq_idle_is_not_returned(
    backend_url: URL, state: str
) -> None:
    """libpq IDLE, but psycopg in a block whose rollback() it refuses: the pool must see
    the refusal and discard the connection, else every later commit on it fails."""
    factory = DbSessionFactory(backend_url, pool_size=1, max_overflow=0, pool_timeout=2)
    try:
        raw = factory.engine.raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        block = None  # kept: a dropped context would close itself
        if state == "two-phase":
            driver.tpc_begin(driver.xid(1, "dbsession-review", "b"))
            driver.execute("SELECT 1")
            driver._tpc = (driver._tpc[0], True)  # as after tpc_prepare(): libpq IDLE
            driver.pgconn.exec_(b"ROLLBACK")
        else:
            block = driver.transaction()
            block.__enter__()
            driver.execute("SELECT 1")
            driver.pgconn.exec_(b"COMMIT")
        assert driver.pgconn.transaction_status == 0
        raw.close()
        with factory.session_scope() as session:
            assert session.execute(text("SELECT 1")).scalar() == 1
        del block
    finally:
        factory.dispose()


@pytest.mark.backends("postgresql")
def test_async_demoted_primary_pools_are_closed_in_a_greenlet(backend_url: URL) -> None:
    """Disposing an async pool outside a greenlet raised MissingGreenlet per connection,
    which was dropped unclosed (its server session left open)."""
    other = DbSessionFactory(backend_url)
    with other.session_scope() as session:
        session.execute(text("CREATE TABLE review_demoted (id INTEGER)"))
    async_url = backend_url.set(drivername="postgresql+psycopg")

    async def scenario() -> list[int]:
        factory = AsyncDbSessionFactory(async_url)
        async with factory.session_scope(readonly=True) as session:
            pids = [(await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()]

        async def unit(session: object) -> None:
            s: Any = session
            if len(pids) == 1:
                pids.append((await s.execute(text("SELECT pg_backend_pid()"))).scalar_one())
                await s.execute(text("SET TRANSACTION READ ONLY"))
            await s.execute(text("INSERT INTO review_demoted VALUES (1)"))

        await factory.run_in_transaction(unit)
        await factory.dispose()
        return pids

    try:
        pids = asyncio.run(scenario())
        with other.session_scope() as session:
            still = session.execute(
                text("SELECT pid FROM pg_stat_activity WHERE pid = ANY(:pids)"), {"pids": pids}
            ).all()
        assert still == []
    finally:
        with other.session_scope() as session:
            session.execute(text("DROP TABLE review_demoted"))
        other.dispose()
