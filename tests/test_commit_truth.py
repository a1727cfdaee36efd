"""Issue 24: a scope never reports a commit that did not happen.

- A database error caught inside a scope marks the unit of work as needing rollback: on
  PostgreSQL the transaction is aborted and COMMIT is answered with ROLLBACK without an
  error, so the scope used to exit normally and run its on_commit hooks for nothing;
  SQLite and MariaDB kept the other writes. Now every backend refuses to commit
  (NeedsRollbackError), and a joined scope around the optional statement keeps the rest.
- ``session.commit()`` inside a scope only flushes: the unit commits when the scope
  ends, so a helper that commits cannot break all-or-nothing (it used to commit the
  outer unit in the middle, and a joined scope then failed with ResourceClosedError).
  ``session.rollback()`` inside a scope dooms the unit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from helpers import pool_checked_out as checked_out
from helpers import rename_first
from sqlalchemy import text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import IntegrityError, InvalidRequestError, PendingRollbackError
from sqlalchemy.orm import Session
from test_testing import run_inner, toy_rows, toy_table_dropped_after

from dbsession import (
    DbSessionFactory,
    NeedsRollbackError,
    TransactionAbortedError,
    current_session,
    default_factory,
    on_commit,
    session_scope,
)
from dbsession.example.models import Supplier

pytest_plugins = ["pytester"]

DUPLICATE = text("INSERT INTO supplier (name) VALUES ('first')")


def names(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(text("SELECT name FROM supplier")))


@pytest.fixture
def one_supplier(factory: DbSessionFactory) -> DbSessionFactory:
    """The factory, with supplier 1 already there (the optional insert collides with it)."""
    with factory.session_scope() as session:
        session.add(Supplier(name="first"))
    return factory


# --- a database error caught inside the scope ------------------------------------------


def test_a_caught_integrity_error_makes_the_scope_refuse_to_commit(
    one_supplier: DbSessionFactory, other_connection: Engine
) -> None:
    hooks: list[str] = []
    with pytest.raises(NeedsRollbackError, match="caught inside the scope") as raised:
        with one_supplier.session_scope() as session:
            session.add(Supplier(name="kept?"))
            session.flush()
            try:
                session.execute(DUPLICATE)  # the optional extra statement
            except IntegrityError:
                pass  # the app carries on
            on_commit(lambda: hooks.append("sent"))
    assert isinstance(raised.value.__cause__, IntegrityError)
    assert isinstance(raised.value, PendingRollbackError)  # SQLAlchemy's own class
    assert isinstance(raised.value, TransactionAbortedError)
    assert hooks == []  # no hook runs for a unit that was not committed
    assert names(other_connection) == {"first"}  # everything rolled back, on every backend
    assert checked_out(one_supplier.engine) == 0


def test_a_joined_scope_around_the_optional_statement_keeps_the_rest(
    one_supplier: DbSessionFactory, other_connection: Engine
) -> None:
    hooks: list[str] = []
    with one_supplier.session_scope() as session:
        session.add(Supplier(name="kept"))
        session.flush()
        try:
            with one_supplier.session_scope():  # a SAVEPOINT
                session.execute(DUPLICATE)
        except IntegrityError:
            pass
        session.add(Supplier(name="after"))
        on_commit(lambda: hooks.append("sent"))
    assert names(other_connection) == {"first", "kept", "after"}
    assert hooks == ["sent"]


def test_an_error_caught_inside_a_joined_scope_refuses_that_scope_only(
    one_supplier: DbSessionFactory, other_connection: Engine
) -> None:
    with one_supplier.session_scope() as session:
        session.add(Supplier(name="kept"))
        with pytest.raises(NeedsRollbackError, match="joined scope"):
            with one_supplier.session_scope() as inner:
                inner.add(Supplier(name="lost with its savepoint"))
                inner.flush()
                try:
                    inner.execute(DUPLICATE)
                except IntegrityError:
                    pass
        session.add(Supplier(name="after"))
    assert names(other_connection) == {"first", "kept", "after"}


def test_a_begin_nested_block_of_the_apps_own_counts_as_the_savepoint(
    one_supplier: DbSessionFactory, other_connection: Engine
) -> None:
    with one_supplier.session_scope() as session:
        session.add(Supplier(name="kept"))
        session.flush()
        try:
            with session.begin_nested():
                session.execute(DUPLICATE)
        except IntegrityError:
            pass
        session.add(Supplier(name="after"))
    assert names(other_connection) == {"first", "kept", "after"}


def test_an_error_caught_after_its_own_joined_scope_still_dooms_the_unit(
    one_supplier: DbSessionFactory, other_connection: Engine
) -> None:
    with pytest.raises(NeedsRollbackError):
        with one_supplier.session_scope() as session:
            with one_supplier.session_scope() as inner:
                inner.add(Supplier(name="released"))
            try:
                session.execute(DUPLICATE)  # outside the joined scope: the whole unit
            except IntegrityError:
                pass
    assert names(other_connection) == {"first"}


def test_an_error_on_another_connection_does_not_doom_the_unit(
    one_supplier: DbSessionFactory, other_connection: Engine
) -> None:
    with one_supplier.session_scope() as session:
        session.add(Supplier(name="kept"))
        session.flush()
        if one_supplier.url.get_backend_name() != "sqlite":  # SQLite: one writer at a time
            with one_supplier.engine.connect() as conn, pytest.raises(IntegrityError):
                conn.execute(DUPLICATE)
    assert names(other_connection) == {"first", "kept"}


def test_a_caught_error_in_a_read_only_scope_changes_nothing(
    one_supplier: DbSessionFactory,
) -> None:
    with one_supplier.session_scope(readonly=True) as session:
        try:
            session.execute(text("SELECT no_such_column FROM supplier"))
        except Exception:  # noqa: BLE001 - whatever the backend raises
            pass
    with one_supplier.session_scope() as session:  # nothing was left behind
        assert session.execute(text("SELECT count(*) FROM supplier")).scalar_one() == 1


def test_a_failed_unit_leaves_no_mark_on_the_next_one(
    one_supplier: DbSessionFactory, other_connection: Engine
) -> None:
    with pytest.raises(NeedsRollbackError):
        with one_supplier.session_scope() as session:
            try:
                session.execute(DUPLICATE)
            except IntegrityError:
                pass
    with one_supplier.engine.connect() as conn:  # outside any scope: nobody to refuse
        with pytest.raises(IntegrityError):
            conn.execute(DUPLICATE)
    for name in ("next", "and the next"):  # the same pooled connections, clean units
        with one_supplier.session_scope() as session:
            session.add(Supplier(name=name))
    assert names(other_connection) == {"first", "next", "and the next"}


def test_run_in_transaction_does_not_retry_a_caught_integrity_error(
    one_supplier: DbSessionFactory,
) -> None:
    attempts: list[int] = []

    def unit(session: Session) -> None:
        attempts.append(1)
        assert current_session() is session
        try:
            session.execute(DUPLICATE)
        except IntegrityError:
            pass

    with pytest.raises(NeedsRollbackError):
        one_supplier.run_in_transaction(unit)
    assert len(attempts) == 1


# --- session.commit() and session.rollback() inside a scope -----------------------------


def test_session_commit_inside_a_scope_only_flushes(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    with pytest.raises(RuntimeError, match="payment declined"):
        with factory.session_scope() as session:
            session.add(Supplier(name="half"))
            session.commit()  # a SQLModel-style helper
            assert session.scalars(Supplier.__table__.select()).all()  # flushed, visible
            raise RuntimeError("payment declined")
    assert names(other_connection) == set()  # all or nothing


def test_session_commit_inside_a_joined_scope_leaves_the_commit_to_the_outer_one(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    hooks: list[str] = []
    with pytest.raises(RuntimeError, match="outer fails"):
        with factory.session_scope() as session:
            session.add(Supplier(name="outer"))
            with factory.session_scope() as inner:
                inner.add(Supplier(name="inner"))
                on_commit(lambda: hooks.append("sent"))
                inner.commit()
            raise RuntimeError("outer fails")
    assert names(other_connection) == set()
    assert hooks == []
    with factory.session_scope() as session:
        session.add(Supplier(name="a"))
        with factory.session_scope() as inner:
            inner.add(Supplier(name="b"))
            inner.commit()
        session.commit()
        session.add(Supplier(name="c"))
    assert names(other_connection) == {"a", "b", "c"}


@pytest.mark.backends("postgresql")
def test_a_caught_failure_on_the_drivers_own_connection_is_not_reported_committed(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    """A statement run on the driver's cursor, out of SQLAlchemy's sight, fails and is
    caught: PostgreSQL has aborted the transaction, and psycopg's COMMIT of it rolls back
    without an error. The unit reported a commit and ran its hooks."""
    hooks: list[str] = []
    with pytest.raises(NeedsRollbackError, match="driver's own connection"):
        with factory.session_scope() as session:
            session.add(Supplier(name="lost"))
            session.flush()
            on_commit(lambda: hooks.append("sent"))
            cursor = session.connection().connection.cursor()
            with pytest.raises(psycopg.errors.DivisionByZero):
                cursor.execute("SELECT 1/0")
    assert names(other_connection) == set() and hooks == []
    assert checked_out(factory.engine) == 0


@pytest.mark.parametrize("method", ["rollback", "reset"])
def test_session_rollback_inside_a_scope_dooms_the_unit(
    factory: DbSessionFactory, other_connection: Engine, method: str
) -> None:
    """``reset()`` rolls back too: the unit committed what came after it, and reported
    it (with its hooks) as the whole unit."""
    hooks: list[str] = []
    with pytest.raises(NeedsRollbackError, match=rf"session\.{method}\(\)"):
        with factory.session_scope() as session:
            session.add(Supplier(name="before"))
            session.flush()
            getattr(session, method)()
            session.add(Supplier(name="after"))
            on_commit(lambda: hooks.append("sent"))
    assert names(other_connection) == set()
    assert hooks == []
    with pytest.raises(NeedsRollbackError, match="joined scope"):
        with factory.session_scope() as session:
            session.add(Supplier(name="outer"))
            with factory.session_scope() as inner:
                getattr(inner, method)()
    assert names(other_connection) == set()
    assert checked_out(factory.engine) == 0


def test_outside_a_scope_commit_and_rollback_are_sqlalchemys(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    with factory.create_session() as session:
        session.add(Supplier(name="committed"))
        session.commit()
        session.add(Supplier(name="rolled back"))
        session.rollback()
    with factory.session_scope() as session:
        session.add(Supplier(name="in a scope"))
    with pytest.raises(InvalidRequestError, match="closed"):
        session.commit()  # after its scope, as in SQLAlchemy: the session is closed
    with pytest.raises(RuntimeError), factory.session_scope() as failed:
        raise RuntimeError
    with pytest.raises(InvalidRequestError, match="closed"):
        failed.commit()
    assert names(other_connection) == {"committed", "in a scope"}


def test_the_module_level_scope_follows_the_same_rules(backend_url: URL) -> None:
    DbSessionFactory.global_init(backend_url)
    engine = default_factory().engine
    Supplier.metadata.create_all(engine)
    try:
        with pytest.raises(RuntimeError):
            with session_scope() as session:
                session.add(Supplier(name="x"))
                session.commit()
                raise RuntimeError
        with session_scope() as session:
            assert session.execute(text("SELECT count(*) FROM supplier")).scalar_one() == 0
    finally:
        Supplier.metadata.drop_all(engine)


# --- the pool's reset after a COMMIT: whatever is left open is rolled back -------------


def raw_after_a_commit(factory: DbSessionFactory, statement: str) -> None:
    """Commit a row, then run ``statement`` on the same connection's raw driver cursor and
    return the connection to the pool with it open."""
    with factory.engine.connect() as conn:
        conn.execute(text("INSERT INTO supplier (name) VALUES ('committed')"))
        conn.commit()
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(statement)
        cursor.fetchall()
        cursor.close()


@pytest.mark.backends("postgresql", "mysql")
def test_a_result_set_after_a_commit_is_still_rolled_back(
    one_supplier: DbSessionFactory, other_connection: Engine
) -> None:
    # PyMySQL's server_status comes from OK packets only: a result set after the COMMIT
    # (here the lock of a SELECT ... FOR UPDATE) leaves it saying "no transaction".
    raw_after_a_commit(one_supplier, "SELECT * FROM supplier WHERE name = 'first' FOR UPDATE")
    rename_first(other_connection)  # the lock was released: the transaction ended
    assert names(other_connection) == {"renamed", "committed"}


@pytest.mark.backends("postgresql", "mysql")
def test_a_returning_insert_after_a_commit_is_never_committed_by_the_next_unit(
    one_supplier: DbSessionFactory, other_connection: Engine
) -> None:
    raw_after_a_commit(one_supplier, "INSERT INTO supplier (name) VALUES ('left') RETURNING name")
    with one_supplier.session_scope() as session:  # the next unit, same pooled connection
        session.add(Supplier(name="next"))
    assert names(other_connection) == {"first", "committed", "next"}


@pytest.mark.backends("postgresql", "mysql")
def test_a_failed_first_statement_after_a_commit_is_rolled_back(
    one_supplier: DbSessionFactory, other_connection: Engine
) -> None:
    with pytest.raises(IntegrityError):  # MariaDB keeps a lock on the duplicate key
        with one_supplier.session_scope() as session:
            session.execute(DUPLICATE)
    rename_first(other_connection)  # the lock was released: the transaction ended
    assert names(other_connection) == {"renamed"}


@pytest.mark.backends("postgresql", "mysql")
def test_the_pool_still_rolls_back_what_a_raw_connection_left_open(
    one_supplier: DbSessionFactory, other_connection: Engine
) -> None:
    raw = one_supplier.engine.raw_connection()  # the connection the committed unit used
    cursor = raw.cursor()
    cursor.execute("INSERT INTO supplier (name) VALUES ('never committed')")
    cursor.execute("SELECT * FROM supplier WHERE name = 'first' FOR UPDATE")
    cursor.close()
    raw.close()
    rename_first(other_connection)
    assert names(other_connection) == {"renamed"}


def test_work_after_a_commit_on_the_same_connection_is_rolled_back(
    one_supplier: DbSessionFactory, other_connection: Engine
) -> None:
    with one_supplier.engine.connect() as conn:
        conn.execute(text("INSERT INTO supplier (name) VALUES ('committed')"))
        conn.commit()
        conn.execute(text("INSERT INTO supplier (name) VALUES ('left open')"))
    assert names(other_connection) == {"first", "committed"}


@pytest.mark.backends("postgresql")
@pytest.mark.parametrize("block", ["a failed two-phase prepare", "a Transaction block"])
def test_a_psycopg_block_left_open_on_a_raw_connection_never_reaches_a_unit(
    factory: DbSessionFactory, block: str
) -> None:
    """libpq says idle, but psycopg refuses rollback() in its own open block: the pool
    must see that refusal and drop the connection, else every later unit fails on it."""
    raw = factory.engine.raw_connection()
    driver: Any = raw.driver_connection
    kept = None
    if block == "a failed two-phase prepare":
        driver.tpc_begin(driver.xid(1, "dbsession-test", "b"))
        driver.execute("SELECT 1")
        with pytest.raises(psycopg.Error):  # max_prepared_transactions = 0 here
            driver.tpc_prepare()
    else:
        kept = driver.transaction()  # kept: a dropped context would close itself
        kept.__enter__()
        driver.execute("SELECT 1")
        driver.pgconn.exec_(b"COMMIT")
    assert driver.pgconn.transaction_status == 0  # libpq: idle
    raw.close()
    with factory.session_scope() as session:
        session.add(Supplier(name="after it"))
    with factory.session_scope() as session:
        assert session.scalar(text("SELECT count(*) FROM supplier")) == 1
    del kept


# --- the same rules under the pytest plugin's db_session --------------------------------

PLUGIN_TESTS = """
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

import toyapp
from dbsession import NeedsRollbackError, on_commit, session_scope


def test_a_helper_that_commits_stays_all_or_nothing(db_session):
    with pytest.raises(RuntimeError):
        with session_scope() as session:
            session.add(toyapp.Item(name="half"))
            session.commit()
            raise RuntimeError("payment declined")
    assert toyapp.names() == []
    with session_scope() as session:
        session.add(toyapp.Item(name="outer"))
        with session_scope() as inner:
            inner.add(toyapp.Item(name="inner"))
            inner.commit()
    assert toyapp.names() == ["inner", "outer"]


def test_a_caught_database_error_refuses_the_commit(db_session, dbsession_capture_on_commit):
    toyapp.add_item("first")
    with dbsession_capture_on_commit() as hooks:
        with pytest.raises(NeedsRollbackError):
            with session_scope() as session:
                session.add(toyapp.Item(name="lost"))
                session.flush()
                try:
                    session.execute(text("INSERT INTO toy_item (name) VALUES ('first')"))
                except IntegrityError:
                    pass
                on_commit(lambda: None)
    assert hooks == []
    assert toyapp.names() == ["first"]
    toyapp.add_item("second")  # the test's transaction is usable
    assert toyapp.names() == ["first", "second"]
"""


@pytest.fixture
def toy_app(pytester: pytest.Pytester, other_connection: Engine) -> Iterator[Engine]:
    from helpers import TOY_APP

    pytester.makepyfile(toyapp=TOY_APP)
    yield from toy_table_dropped_after(other_connection)


def test_under_db_session_the_same_rules_hold(
    pytester: pytest.Pytester, backend_url: URL, toy_app: Engine
) -> None:
    pytester.makepyfile(test_rules=PLUGIN_TESTS)
    run_inner(pytester, backend_url).assert_outcomes(passed=2)
    assert toy_rows(toy_app) == 0
