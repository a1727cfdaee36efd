"""Issue 12: an error inside a savepoint that loses the whole transaction never lets the
outer scope commit half a unit of work.

Real faults on real servers: an InnoDB / PostgreSQL deadlock (1213, 40P01), a lock wait
timeout (1205), a serialization failure (40001) and a connection killed from another
session, each raised inside a joined scope whose caller catches the error and carries
on. The outer scope must refuse to commit (TransactionAbortedError, chaining the cause),
and ``run_in_transaction`` must run the whole unit again and end with the full result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from server_helpers import checked_out, kill, server_pid
from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from dbsession import DbSessionFactory, on_commit
from dbsession._classify import transient_reason
from dbsession.errors import TransactionAbortedError
from dbsession.example.models import Customer, Supplier

DEADLOCK = {"mysql": "1213", "postgresql": "SQLSTATE 40P01"}
LOCK = "SELECT id FROM supplier WHERE name = :name FOR UPDATE"
Fault = Callable[[Session], None]


def names(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(text("SELECT name FROM supplier")))


@pytest.fixture
def rows(factory: DbSessionFactory) -> None:
    with factory.session_scope() as session:
        session.add_all([Supplier(name="x"), Supplier(name="y")])


@contextmanager
def contender(url: URL, *, heavy: bool) -> Iterator[Callable[[], None]]:
    """Another connection, in a thread, that holds ``y`` and, once told to go, waits for
    ``x``: with a unit of work holding ``x`` and then asking for ``y``, a real deadlock.

    ``heavy``: it first writes 30 rows it never commits, so InnoDB (which picks the
    lighter transaction) chooses the unit of work as the victim. PostgreSQL's victim is
    the transaction that waited first, the unit of work here. Yields ``go``.
    """
    engine = create_engine(url, poolclass=NullPool)
    holding, go, done = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with engine.connect() as conn, conn.begin() as transaction:
                if heavy:
                    conn.execute(
                        insert(Customer),
                        [{"name": f"c{i}", "email": f"c{i}@example.com"} for i in range(30)],
                    )
                conn.execute(text(LOCK), {"name": "y"})
                holding.set()
                go.wait(10)
                time.sleep(0.3)  # the unit of work is waiting for y by now
                try:
                    conn.execute(text(LOCK), {"name": "x"})
                finally:
                    transaction.rollback()
        except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(error)
        finally:
            holding.set()
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert holding.wait(10)
    try:
        yield go.set
    finally:
        go.set()
        thread.join(20)
        engine.dispose()
    assert not thread.is_alive()
    assert errors == [], errors


def deadlock(url: URL) -> Fault:
    def fault(session: Session) -> None:
        session.execute(text(LOCK), {"name": "x"})
        with contender(url, heavy=True) as go:
            go()
            session.execute(text(LOCK), {"name": "y"})  # the deadlock victim

    return fault


def lock_wait_timeout(url: URL) -> Fault:
    def fault(session: Session) -> None:
        with contender(url, heavy=False):  # holds y and never asks for x
            session.execute(text(LOCK), {"name": "y"})

    return fault


def killed(admin: Engine) -> Fault:
    def fault(session: Session) -> None:
        kill(admin, [server_pid(session)])
        session.execute(text("SELECT 1"))

    return fault


def serialization_failure(url: URL) -> Fault:
    """REPEATABLE READ on PostgreSQL: the unit read x, another transaction changed and
    committed it, the unit then updates it: 40001."""

    def fault(session: Session) -> None:
        engine = create_engine(url, poolclass=NullPool)
        with engine.begin() as conn:
            conn.execute(text("UPDATE supplier SET name = 'x2' WHERE name = 'x'"))
        engine.dispose()
        session.execute(text("UPDATE supplier SET name = 'x3' WHERE name = 'x'"))

    return fault


def make_fault(name: str, factory: DbSessionFactory, admin: Engine) -> Fault:
    url = factory.url
    return {
        "deadlock": deadlock(url),
        "lock wait timeout": lock_wait_timeout(url),
        "killed connection": killed(admin),
        "serialization failure": serialization_failure(url),
    }[name]


@pytest.fixture
def admin(factory: DbSessionFactory, rows: None) -> Iterator[Engine]:
    """A connection of its own to kill the unit's connection from (and the example rows)."""
    engine = create_engine(factory.url, poolclass=NullPool)
    yield engine
    engine.dispose()


class Unit:
    """A unit of work that writes, reads x, then runs ``fault`` in a joined scope, catches
    its error and carries on writing: committing it would save half the unit. Records
    the nested errors it caught and the hooks that ran, per attempt."""

    def __init__(self, factory: DbSessionFactory, fault: Fault | None) -> None:
        self.factory = factory
        self.fault = fault
        self.caught: list[list[BaseException]] = []
        self.hooks: list[int] = []

    def __call__(self, session: Session) -> int:
        attempt = len(self.caught) + 1
        self.caught.append([])
        if session.get_bind().dialect.name == "mysql":
            session.execute(text("SET SESSION innodb_lock_wait_timeout = 1"))
        session.add(Supplier(name="before"))
        session.flush()
        session.execute(text("SELECT name FROM supplier WHERE name = 'x'"))  # the snapshot
        try:
            with self.factory.session_scope() as nested:
                nested.add(Supplier(name="inside"))
                nested.flush()
                if self.fault is not None and attempt == 1:
                    self.fault(nested)
        except SQLAlchemyError as error:
            self.caught[-1].append(error)
        session.add(Supplier(name="after"))
        on_commit(lambda: self.hooks.append(attempt))
        return attempt


def isolation(factory: DbSessionFactory) -> str | None:
    """REPEATABLE READ on PostgreSQL (where a serialization failure needs it)."""
    return "REPEATABLE READ" if factory.url.get_backend_name() == "postgresql" else None


def check_the_outer_scope_refuses(
    factory: DbSessionFactory, fault: Fault, other_connection: Engine, expected: str
) -> None:
    """``expected``: what the nested error is (``transient_reason``, or "disconnect")."""
    unit = Unit(factory, fault)
    with pytest.raises(TransactionAbortedError) as raised:
        with factory.session_scope(isolation_level=isolation(factory)) as session:
            unit(session)
    [nested] = unit.caught[0]
    assert isinstance(nested, DBAPIError)
    dialect = factory.url.get_backend_name()
    reason = "disconnect" if nested.connection_invalidated else transient_reason(nested, dialect)
    assert reason is not None and reason.startswith(expected), reason
    assert raised.value.__cause__ is nested
    assert unit.hooks == []
    assert names(other_connection) & {"before", "inside", "after"} == set()
    assert checked_out(factory.engine) == 0
    with factory.session_scope() as session:  # the next unit of work is not affected
        session.add(Supplier(name="next"))
    assert "next" in names(other_connection)


def check_run_in_transaction_retries_the_whole_unit(
    factory: DbSessionFactory, fault: Fault, other_connection: Engine
) -> None:
    unit = Unit(factory, fault)
    assert factory.transactional(isolation_level=isolation(factory))(unit)() == 2
    assert [len(caught) for caught in unit.caught] == [1, 0]
    assert unit.hooks == [2]
    assert names(other_connection) == {"x", "y", "before", "inside", "after"} or (
        names(other_connection) == {"x2", "y", "before", "inside", "after"}
    )


@pytest.mark.backends("mysql", "postgresql")
@pytest.mark.parametrize("fault", ["deadlock", "killed connection"])
def test_a_lost_transaction_is_not_committed_by_the_outer_scope(
    factory: DbSessionFactory, admin: Engine, other_connection: Engine, fault: str
) -> None:
    backend = factory.url.get_backend_name()
    expected = {"killed connection": "disconnect", "deadlock": DEADLOCK[backend]}[fault]
    fault_ = make_fault(fault, factory, admin)
    check_the_outer_scope_refuses(factory, fault_, other_connection, expected)


@pytest.mark.backends("mysql")
def test_a_lock_wait_timeout_in_a_savepoint_is_not_committed_by_the_outer_scope(
    factory: DbSessionFactory, admin: Engine, other_connection: Engine
) -> None:
    """This server runs with innodb_rollback_on_timeout=OFF (MariaDB's default; a startup
    option): the timeout rolled back the statement only, and the unit is refused anyway,
    since dbsession cannot tell what the server rolled back."""
    fault = make_fault("lock wait timeout", factory, admin)
    check_the_outer_scope_refuses(factory, fault, other_connection, "1205")


@pytest.mark.backends("postgresql")
def test_a_serialization_failure_in_a_savepoint_is_not_committed_by_the_outer_scope(
    factory: DbSessionFactory, admin: Engine, other_connection: Engine
) -> None:
    fault = make_fault("serialization failure", factory, admin)
    check_the_outer_scope_refuses(factory, fault, other_connection, "SQLSTATE 40001")


@pytest.mark.backends("mysql", "postgresql")
def test_run_in_transaction_runs_the_whole_unit_again_after_a_deadlock_in_a_savepoint(
    factory: DbSessionFactory, admin: Engine, other_connection: Engine
) -> None:
    fault = make_fault("deadlock", factory, admin)
    check_run_in_transaction_retries_the_whole_unit(factory, fault, other_connection)


@pytest.mark.backends("mysql")
def test_run_in_transaction_runs_the_whole_unit_again_after_a_lock_wait_timeout(
    factory: DbSessionFactory, admin: Engine, other_connection: Engine
) -> None:
    fault = make_fault("lock wait timeout", factory, admin)
    check_run_in_transaction_retries_the_whole_unit(factory, fault, other_connection)


@pytest.mark.backends("postgresql")
def test_run_in_transaction_runs_the_whole_unit_again_after_a_serialization_failure(
    factory: DbSessionFactory, admin: Engine, other_connection: Engine
) -> None:
    fault = make_fault("serialization failure", factory, admin)
    check_run_in_transaction_retries_the_whole_unit(factory, fault, other_connection)


@pytest.mark.backends("mysql", "postgresql")
def test_run_in_transaction_does_not_retry_a_unit_whose_connection_was_killed(
    factory: DbSessionFactory, admin: Engine, other_connection: Engine
) -> None:
    unit = Unit(factory, make_fault("killed connection", factory, admin))
    with pytest.raises(TransactionAbortedError):
        factory.run_in_transaction(unit)
    assert len(unit.caught) == 1  # a disconnect is not transient: one attempt
    assert names(other_connection) == {"x", "y"}
    assert checked_out(factory.engine) == 0
