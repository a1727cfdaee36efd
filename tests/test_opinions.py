"""The engine's opinions at their price: liveness check instead of pre-ping, the pool size,
the SQLite read-only twin, the plugin's joined sessionmaker made once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import server_pid, statements
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Engine

import dbsession._engine as engine_module
from dbsession import DbSessionFactory, ReadOnlyError, Timeouts
from dbsession.example.models import Supplier

SERVERS_ONLY = pytest.mark.backends("postgresql", "mysql")


@pytest.fixture
def pings(factory: DbSessionFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """Every ping the engine's dialect sends from now on, and whether it succeeded."""
    yield recorded_pings(factory, monkeypatch)


def recorded_pings(factory: DbSessionFactory, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    dialect: Any = factory.engine.dialect
    real = dialect.do_ping
    seen: list[bool] = []

    def do_ping(dbapi_connection: Any) -> bool:
        seen.append(bool(real(dbapi_connection)))
        return seen[-1]

    monkeypatch.setattr(dialect, "do_ping", do_ping)
    return seen


@SERVERS_ONLY
def test_a_connection_in_use_is_not_pinged(factory: DbSessionFactory, pings: list[bool]) -> None:
    for i in range(20):
        with factory.session_scope() as session:
            session.add(Supplier(name=f"s{i}"))
    assert pings == []


@SERVERS_ONLY
def test_a_connection_idle_past_the_threshold_is_pinged_first(
    backend_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = DbSessionFactory(backend_url, timeouts=Timeouts(ping_after_idle=0.2))
    try:
        pings = recorded_pings(made, monkeypatch)
        with made.session_scope() as session:
            first = server_pid(session)
        time.sleep(0.3)
        with made.session_scope() as session:
            assert server_pid(session) == first  # pinged, alive, kept
        assert pings == [True]
    finally:
        made.dispose()


@pytest.mark.backends("postgresql")
def test_a_live_connection_with_a_message_waiting_is_pinged_and_kept(
    factory: DbSessionFactory, other_connection: Engine, pings: list[bool]
) -> None:
    """A NOTIFY makes the idle socket readable, like a closed one: the ping tells them apart."""
    with factory.engine.connect() as conn:
        conn.execute(text("LISTEN dbsession_test"))
        conn.commit()
        listener = server_pid(conn)
    with other_connection.connect() as conn:
        conn.execute(text("NOTIFY dbsession_test"))
        conn.commit()
    idle: Any = factory.engine.pool._pool.queue[0]  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while engine_module._quiet(idle.dbapi_connection, idle.info) and time.monotonic() < deadline:
        time.sleep(0.01)  # the server sends the notification on its own time
    with factory.engine.connect() as conn:
        assert server_pid(conn) == listener
    assert pings == [True]


def test_overflow_connections_do_not_churn_with_8_threads(factory: DbSessionFactory) -> None:
    opened: list[int] = []
    event.listen(factory.engine, "connect", lambda *args: opened.append(1))
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def work(number: int) -> None:
        try:
            start.wait()
            for i in range(25):
                with factory.session_scope() as session:
                    session.add(Supplier(name=f"t{number}-{i}"))
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(opened) <= 8  # never more than the threads: none closed and reopened
    with factory.session_scope(readonly=True) as session:
        assert session.scalar(text("SELECT COUNT(*) FROM supplier")) == 200


@pytest.mark.backends("sqlite")
def test_sqlite_read_only_scopes_run_on_their_own_query_only_pool(
    factory: DbSessionFactory,
) -> None:
    twin = factory._build().read_only_engine()
    assert isinstance(twin, Engine) and twin is factory._build().read_only_engine()
    seen = statements(factory.engine, twin)
    for _ in range(3):
        with factory.session_scope(readonly=True) as session:
            session.execute(text("SELECT COUNT(*) FROM supplier"))
    # BEGIN goes to the driver directly (not through cursor events); no PRAGMA per scope.
    assert seen == ["SELECT COUNT(*) FROM supplier"] * 3
    with pytest.raises(ReadOnlyError):
        with factory.session_scope(readonly=True) as session:
            session.execute(text("DELETE FROM supplier"))
    with factory.session_scope() as session:  # writing scopes are not on that pool
        session.add(Supplier(name="written"))
    factory.dispose()
    assert twin.pool.checkedin() == 0  # type: ignore[attr-defined]


def test_no_read_only_twin_before_it_is_needed(backend_url: Any) -> None:
    made = DbSessionFactory(backend_url)
    try:
        binding = made._build()
        with made.session_scope() as session:
            session.execute(text("SELECT 1"))
        assert binding.engines() == [made.engine]
        with made.session_scope(readonly=True) as session:
            session.execute(text("SELECT 1"))
        assert binding.engines() == [made.engine, binding.read_only_engine()]
    finally:
        made.dispose()


def test_the_plugin_joined_sessionmaker_is_made_once(factory: DbSessionFactory) -> None:
    binding = factory._build()
    with factory.engine.connect() as one, factory.engine.connect() as two:
        first = binding.joined_to(one).maker()()
        second = binding.joined_to(two).maker()()
        assert type(first) is type(second)  # one Session subclass, not one per test
        assert (first.get_bind(), second.get_bind()) == (one, two)
        assert first.join_transaction_mode == "create_savepoint"
        first.close()
        second.close()


@SERVERS_ONLY
def test_the_read_only_and_timeout_hooks_live_on_their_views_not_the_engine(
    factory: DbSessionFactory,
) -> None:
    """An engine-level ``begin`` listener runs for every scope: the read-only hook (and
    a scope time budget) live on the views of the scopes that need them."""
    with factory.session_scope(readonly=True) as session:
        session.execute(text("SELECT 1"))
    with factory.session_scope(timeout=5) as session:
        session.add(Supplier(name="written"))
    names = [fn.__qualname__ for fn in factory.engine.dispatch.begin]
    assert not [n for n in names if "read_only" in n or "scope_timeouts" in n], names


def test_no_engine_sends_its_statements_through_sqlalchemys_event_dispatch(
    factory: DbSessionFactory,
) -> None:
    """A connection-level listener on an engine (begin, commit, cursor events) makes
    SQLAlchemy dispatch events around every statement of every scope: dbsession installs
    none on its engines (nor on the read-only twins), whatever the scopes asked for."""
    with factory.session_scope() as session:
        session.add(Supplier(name="written"))
    with factory.session_scope(readonly=True) as session:
        session.execute(text("SELECT 1"))
    with factory.session_scope(timeout=5) as session:
        session.execute(text("SELECT 1"))
    engines = [factory.engine, factory._build().read_only_engine()]
    assert [engine._has_events for engine in engines if engine] == [False, False]
