"""The retry policy's failover cases, on the real PostgreSQL server (the clusters'
workloads are tests/test_cluster_patroni.py and tests/test_cluster_galera.py): a budget
in time, a refused connect retried but a wrong database not, a demoted primary's
refusal retried on a fresh connection, MariaDB 1020 a conflict."""

from __future__ import annotations

import asyncio
import time

import pymysql  # type: ignore[import-untyped]
import pytest
from helpers import server_pid
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from dbsession import DbSessionFactory, RetryPolicy, Timeouts
from dbsession._classify import transient_reason
from dbsession._retry import retry_reason
from dbsession.asyncio import AsyncDbSessionFactory
from dbsession.errors import (
    ConfigurationError,
    DatabaseReadOnlyError,
    DatabaseUnreachableError,
    RetryExhaustedError,
)


def _select(session: Session) -> None:
    session.execute(text("SELECT 1"))


def test_a_refused_connect_is_retried_until_the_budget_runs_out(postgresql_url: URL) -> None:
    down = DbSessionFactory(postgresql_url.set(port=1), timeouts=Timeouts(connect=2))
    started = time.monotonic()
    try:
        with pytest.raises(RetryExhaustedError, match="in 1.") as raised:
            down.transactional(retry=RetryPolicy(budget=1.0))(_select)()
    finally:
        down.dispose()
    assert 1.0 <= time.monotonic() - started < 5
    assert raised.value.attempts > 2
    assert isinstance(raised.value.last_error, DatabaseUnreachableError)


def test_a_wrong_database_is_not_retried(postgresql_url: URL) -> None:
    wrong = DbSessionFactory(postgresql_url.set(database="no_such_database_here"))
    started = time.monotonic()
    try:
        with pytest.raises(DatabaseUnreachableError, match="no_such_database_here"):
            wrong.transactional(retry=RetryPolicy(budget=10.0))(_select)()
    finally:
        wrong.dispose()
    assert time.monotonic() - started < 5  # not 10 s of retries


@pytest.mark.backends("postgresql")
def test_a_demoted_primary_is_retried_on_a_fresh_connection(factory: DbSessionFactory) -> None:
    with factory.engine.connect() as pooled:  # as if its server had become a standby
        pooled.exec_driver_sql("SET SESSION default_transaction_read_only = on")
        pooled.commit()
    ran: list[int] = []

    def add(session: Session) -> None:
        ran.append(1)
        session.execute(text("INSERT INTO supplier (name) VALUES ('after the failover')"))

    factory.transactional(retry=RetryPolicy())(add)()
    assert len(ran) == 2  # refused once (DatabaseReadOnlyError), then a new connection
    with factory.session_scope() as session:
        assert session.scalar(text("SELECT count(*) FROM supplier")) == 1


@pytest.mark.backends("postgresql", "mysql")
def test_a_demoted_primary_s_read_only_connections_are_dropped_too(
    factory: DbSessionFactory,
) -> None:
    with factory.session_scope(readonly=True) as session:  # pools a read-only connection
        reader = server_pid(session)
    with factory.engine.connect() as pooled:  # as if its server had become a standby
        statement = (
            "SET SESSION default_transaction_read_only = on"
            if pooled.dialect.name == "postgresql"
            else "SET SESSION TRANSACTION READ ONLY"
        )
        pooled.exec_driver_sql(statement)
        pooled.commit()

    def add(session: Session) -> None:
        session.execute(text("INSERT INTO supplier (name) VALUES ('after the failover')"))

    factory.transactional(retry=RetryPolicy())(add)()
    with factory.session_scope(readonly=True) as session:  # not from the demoted primary
        assert server_pid(session) != reader


@pytest.mark.backends("postgresql")
def test_an_async_demoted_primary_s_connections_are_closed(factory: DbSessionFactory) -> None:
    """The async pools are emptied where their connections can be closed (a greenlet):
    outside one each close failed and the server sessions stayed open."""
    url = factory.engine.url.set(drivername="postgresql+psycopg")

    async def scenario() -> list[int]:
        made = AsyncDbSessionFactory(url)
        async with made.session_scope(readonly=True) as session:
            pids = [(await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()]

        async def add(session: AsyncSession) -> None:
            if len(pids) == 1:  # the first attempt: as if its server had become a standby
                pids.append((await session.execute(text("SELECT pg_backend_pid()"))).scalar_one())
                await session.execute(text("SET TRANSACTION READ ONLY"))
            await session.execute(text("INSERT INTO supplier (name) VALUES ('after')"))

        await made.run_in_transaction(add)
        await made.dispose()
        return pids

    pids = asyncio.run(scenario())
    with factory.engine.connect() as conn:
        still = conn.execute(
            text("SELECT pid FROM pg_stat_activity WHERE pid = ANY(:pids)"), {"pids": pids}
        ).all()
    assert still == []


def test_the_failover_errors_are_classified() -> None:
    policy = RetryPolicy()
    refused = DatabaseUnreachableError("Cannot connect ...: connection refused. Check ...")
    bad_password = DatabaseUnreachableError(
        'Cannot connect ...: FATAL: password authentication failed for user "app".'
    )
    assert retry_reason(refused, "postgresql", policy) == "cannot connect yet (connection refused)"
    assert retry_reason(bad_password, "postgresql", policy) is None
    assert retry_reason(DatabaseReadOnlyError("refused"), "postgresql", policy) is not None
    from sqlalchemy.exc import OperationalError

    changed = OperationalError("UPDATE", {}, pymysql.err.OperationalError(1020, "changed"))
    assert transient_reason(changed, "mariadb") is not None and "1020" in str(
        transient_reason(changed, "mariadb")
    )


@pytest.mark.parametrize("options", [{"budget": -1.0}, {"attempts": 0}])
def test_a_budget_or_attempts_that_cannot_work_is_refused(options: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**options)  # type: ignore[arg-type]
