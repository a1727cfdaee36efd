"""Nothing waits for ever: a silent server, a pooled connection whose peer went silent, a
statement or lock wait past session_scope(timeout=), a connection lost during COMMIT.

Each wait runs in a thread joined with a bound well under a minute: a hang fails the test
instead of hanging the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any, TypeVar

import psycopg
import pytest
from deploy_fixtures import TcpProxy
from helpers import BOUND, QUICK, within
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from dbsession import DatabaseUnreachableError, DbSessionFactory, RetryPolicy, Timeouts
from dbsession._pooler import is_lost_connection
from dbsession._retry import run_with_retries
from dbsession._timeouts import current_budget
from dbsession.asyncio import AsyncDbSessionFactory
from dbsession.errors import CommitOutcomeUnknownError, ConnectionLostError, ScopeTimeoutError
from dbsession.example.models import Supplier

T = TypeVar("T")
#: Ping every pooled connection before use (the default pings one idle for 30 s, or whose
#: socket speaks): a peer that went silent a moment ago is caught only by the ping.
PING_ALWAYS = Timeouts(connect=2, read=2, ping=1, ping_after_idle=0)
SLEEP = {"postgresql": "SELECT pg_sleep(10)", "mysql": "SELECT SLEEP(10)"}
SLOW_SQLITE = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"
)


def _on(url: URL, port: int) -> URL:
    return url.set(host="127.0.0.1", port=port)


def _query(factory: DbSessionFactory, sql: str = "SELECT 1") -> Any:
    with factory.session_scope() as session:
        return session.execute(text(sql)).scalar()


@pytest.mark.backends("postgresql", "mysql")
def test_a_server_that_never_answers_fails_the_first_scope(
    backend_url: URL, silent_server: TcpProxy
) -> None:
    # psycopg: the default connect timeout (10 s). PyMySQL reads the server's greeting
    # under its read timeout (default 300 s), so the test shortens that one.
    mysql = backend_url.get_backend_name() == "mysql"
    factory = DbSessionFactory(
        _on(backend_url, silent_server.port), timeouts=Timeouts(read=2) if mysql else None
    )
    try:
        with pytest.raises(DatabaseUnreachableError, match="Cannot connect"):
            within(BOUND, lambda: _query(factory))
    finally:
        factory.dispose()


@pytest.mark.backends("postgresql")  # aiomysql bounds the TCP connect only, not the greeting
def test_a_silent_server_fails_async_scopes_too(backend_url: URL, silent_server: TcpProxy) -> None:
    async def main() -> None:
        factory = AsyncDbSessionFactory(
            _on(backend_url, silent_server.port).set(drivername=backend_url.get_backend_name()),
            timeouts=QUICK,
        )
        try:
            async with factory.session_scope() as session:
                await session.execute(text("SELECT 1"))
        finally:
            await factory.dispose()

    with pytest.raises(DatabaseUnreachableError, match="Cannot connect"):
        within(BOUND, lambda: asyncio.run(main()))


@pytest.fixture
def proxied(backend_url: URL) -> Iterator[tuple[TcpProxy, URL]]:
    """A forwarding proxy in front of the backend's server, and the URL through it."""
    proxy = TcpProxy((backend_url.host or "127.0.0.1", backend_url.port or 0))
    yield proxy, _on(backend_url, proxy.port)
    proxy.close()


@pytest.mark.backends("postgresql", "mysql")
def test_a_pooled_connection_whose_peer_went_silent_does_not_hang_the_pre_ping(
    proxied: tuple[TcpProxy, URL],
) -> None:
    proxy, url = proxied
    factory = DbSessionFactory(url, timeouts=PING_ALWAYS)
    try:
        assert _query(factory) == 1  # a connection is now in the pool
        proxy.mode = "silent"
        with pytest.raises(DatabaseUnreachableError):
            within(BOUND, lambda: _query(factory))
        proxy.mode = "forward"
        assert within(BOUND, lambda: _query(factory)) == 1  # back: the next scope works
    finally:
        factory.dispose()


@pytest.mark.backends("postgresql")
def test_async_pre_ping_of_a_silent_peer_is_bounded_too(proxied: tuple[TcpProxy, URL]) -> None:
    proxy, url = proxied

    async def query(factory: AsyncDbSessionFactory) -> Any:
        async with factory.session_scope() as session:
            return (await session.execute(text("SELECT 1"))).scalar()

    async def main() -> list[Any]:
        factory = AsyncDbSessionFactory(url, timeouts=PING_ALWAYS)
        outcomes: list[Any] = []
        try:
            outcomes.append(await query(factory))
            proxy.mode = "silent"
            try:
                outcomes.append(await query(factory))
            except DatabaseUnreachableError as error:
                outcomes.append(type(error))
            proxy.mode = "forward"
            outcomes.append(await query(factory))
        finally:
            await factory.dispose()
        return outcomes

    assert within(BOUND, lambda: asyncio.run(main())) == [1, DatabaseUnreachableError, 1]


def _timed_out(factory: DbSessionFactory, sql: str) -> ScopeTimeoutError:
    with pytest.raises(ScopeTimeoutError) as raised:
        with factory.session_scope(timeout=1) as session:
            session.execute(text(sql))
    return raised.value


def test_a_statement_past_the_scope_timeout_raises_a_named_error_and_leaves_no_trace(
    factory: DbSessionFactory,
) -> None:
    backend = factory.url.get_backend_name()
    sql = SLOW_SQLITE if backend == "sqlite" else SLEEP[backend]
    error = within(BOUND, lambda: _timed_out(factory, sql))
    assert isinstance(error, OperationalError) and "timeout=1" in str(error)
    if backend != "sqlite":  # the budget ended with its scope: a longer statement runs
        statement = {"postgresql": "SELECT pg_sleep(1.5)", "mysql": "SELECT SLEEP(1.5)"}
        assert within(BOUND, lambda: _query(factory, statement[backend])) is not None


@pytest.mark.backends("sqlite")
def test_a_timed_scope_whose_connection_was_invalidated_rolls_back_cleanly(
    factory: DbSessionFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """As after a disconnect or a cancelled statement: no failed rollback, the next
    (untimed) scope on the pool runs and is not interrupted."""
    with pytest.raises(RuntimeError):
        with factory.session_scope(timeout=5) as session:
            session.add(Supplier(name="lost"))
            session.flush()
            session.connection().invalidate()
            raise RuntimeError("the app's error")
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
    with factory.session_scope() as session:
        session.add(Supplier(name="next"))
    assert _query(factory, "SELECT name FROM supplier") == "next"


@pytest.mark.backends("postgresql", "mysql")
def test_a_lock_wait_past_the_scope_timeout_raises_the_named_error_not_a_retry(
    factory: DbSessionFactory,
) -> None:
    with factory.session_scope() as session:
        session.execute(text("INSERT INTO supplier (id, name) VALUES (1, 'held')"))
    holder = factory.engine.connect()
    try:
        holder.execute(text("UPDATE supplier SET name = 'holder' WHERE id = 1"))

        def contend(session: Session) -> None:
            session.execute(text("UPDATE supplier SET name = 'waiter' WHERE id = 1"))

        def run() -> None:  # run_in_transaction's loop, on scopes with a time budget
            policy = RetryPolicy(attempts=3)
            scope = lambda: factory.session_scope(timeout=1)  # noqa: E731
            run_with_retries(
                scope, contend, policy=policy, dialect_name=factory.url.get_backend_name()
            )

        with pytest.raises(ScopeTimeoutError):
            within(BOUND, run)
    finally:
        holder.rollback()
        holder.close()


@pytest.mark.backends("postgresql")
def test_async_scope_timeout(backend_url: URL) -> None:
    async def main() -> None:
        factory = AsyncDbSessionFactory(backend_url)
        try:
            async with factory.session_scope(timeout=1) as session:
                await session.execute(text("SELECT pg_sleep(10)"))
        finally:
            await factory.dispose()

    with pytest.raises(ScopeTimeoutError):
        within(BOUND, lambda: asyncio.run(main()))


def _cut_on_first_commit(factory: DbSessionFactory, proxy: TcpProxy) -> list[int]:
    """Cut every connection through ``proxy`` just before the first COMMIT is sent."""
    commits: list[int] = []

    @event.listens_for(factory.engine, "commit")
    def cut(connection: Connection) -> None:
        commits.append(1)
        if len(commits) == 1:
            proxy.refuse()
            proxy.mode = "forward"

    return commits


@pytest.mark.backends("postgresql", "mysql")
def test_a_connection_lost_during_commit_is_outcome_unknown_and_retried_only_if_idempotent(
    proxied: tuple[TcpProxy, URL], factory: DbSessionFactory
) -> None:
    proxy, url = proxied
    through = DbSessionFactory(url, timeouts=QUICK)
    ran: list[int] = []

    def unit(session: Session) -> None:
        ran.append(1)
        session.execute(text("INSERT INTO supplier (name) VALUES ('s')"))

    def retried(policy: RetryPolicy) -> None:
        through.transactional(retry=policy)(unit)()

    try:
        _cut_on_first_commit(through, proxy)
        with pytest.raises(CommitOutcomeUnknownError, match="outcome is unknown") as raised:
            within(BOUND, lambda: retried(RetryPolicy()))
        assert isinstance(raised.value, ConnectionLostError) and len(ran) == 1  # not retried

        _cut_on_first_commit(through, proxy)
        within(BOUND, lambda: retried(RetryPolicy(idempotent=True)))
        assert len(ran) >= 3  # the second unit ran again after its lost COMMIT
    finally:
        through.dispose()
    with factory.session_scope() as session:
        assert session.scalar(text("SELECT count(*) FROM supplier")) in (1, 2, 3)


def test_pooler_errors_are_read_as_lost_connections() -> None:
    assert is_lost_connection(
        psycopg.InternalError("received 2 results from command 'COMMIT'"), "postgresql"
    )
    assert not is_lost_connection(psycopg.InternalError("something else"), "postgresql")


@pytest.mark.backends("mysql")
@pytest.mark.parametrize(
    "sql",
    [
        "/* a comment first */ SELECT SLEEP(10)",
        "-- a comment line\nSELECT SLEEP(10)",
        "(SELECT SLEEP(10) LIMIT 1) UNION (SELECT 2 LIMIT 1)",
    ],
    ids=["block comment", "line comment", "union of limited selects"],
)
def test_every_mariadb_statement_of_a_timed_scope_is_bounded(
    factory: DbSessionFactory, sql: str
) -> None:
    """SQLAlchemy's own ``union()`` of LIMITed selects starts with ``(``; a statement may
    start with a comment: both ran unbounded under ``timeout=1``."""
    error = within(BOUND, lambda: _timed_out(factory, sql))
    assert "timeout=1" in str(error)


def test_distinct_budgets_share_one_sessionmaker_and_view_per_kind(
    factory: DbSessionFactory,
) -> None:
    """The remaining request budget passed as timeout= (a new value every time) made a
    sessionmaker and an engine view for each value, kept for ever (177 MB over 5,000)."""
    binding = factory._build()
    for n in range(200):
        with factory.session_scope(timeout=5 + n / 1000) as session:
            session.execute(text("SELECT 1"))
        with factory.session_scope(timeout=5 + n / 1000, readonly=True) as session:
            session.execute(text("SELECT 1"))
    assert len(binding._makers) == 2  # one timed maker per kind of scope, whatever the values
    assert current_budget() is None  # none left behind in this context


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("side", ["sync", "async"])
def test_a_timed_sqlite_writer_waits_for_the_write_gate_only_within_its_budget(
    backend_url: URL, side: str
) -> None:
    """``session_scope(timeout=1)`` waited 8 s for the write gate, then committed: the
    budget bounds the gate wait too, with ScopeTimeoutError while the holder still holds."""
    import threading

    factory = DbSessionFactory(backend_url, sqlite_busy_timeout=30)
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with factory.session_scope() as session:
            session.execute(text("CREATE TABLE IF NOT EXISTS held (n INTEGER)"))
            inside.set()
            leave.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(10)
        if side == "sync":

            def write() -> None:
                with factory.session_scope(timeout=0.5) as session:
                    session.execute(text("INSERT INTO held VALUES (1)"))

        else:

            def write() -> None:
                async def main() -> None:
                    made = AsyncDbSessionFactory(backend_url.set(drivername="sqlite+aiosqlite"))
                    try:
                        async with made.session_scope(timeout=0.5) as session:
                            await session.execute(text("INSERT INTO held VALUES (1)"))
                    finally:
                        await made.dispose()

                asyncio.run(main())

        with pytest.raises(ScopeTimeoutError, match="write lock"):
            within(BOUND, write)
        assert not leave.is_set() and holder.is_alive()  # it gave up; the holder still held
    finally:
        leave.set()
        holder.join()
        factory.dispose()


@pytest.mark.backends("sqlite")
def test_a_timed_session_abandoned_unclosed_leaves_no_budget_behind(
    factory: DbSessionFactory,
) -> None:
    """An interrupt before a scope's ``with`` could close its session: the budget it set in
    this context goes with the session, or later writers here would wait on a stale one."""
    import gc

    session = factory._build().maker(timeout=5)()
    assert current_budget() is not None
    del session
    gc.collect()
    assert current_budget() is None
