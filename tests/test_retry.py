"""run_in_transaction / transactional: transient failures are retried, nothing else is."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

import pytest
from helpers import BASE, CAP, FIVE, THREE, released_on_first_retry, retries, value
from sqlalchemy import text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from dbsession import (
    ConfigurationError,
    DbSessionFactory,
    ReadOnlyError,
    RetryExhaustedError,
    RetryPolicy,
    default_factory,
    on_commit,
    run_in_transaction,
    transactional,
)
from dbsession.example.models import Base, Supplier


class Boom(Exception):
    pass


def increment(session: Session, row: int = 1) -> None:
    """Read, then write: a lost update without SERIALIZABLE, a conflict with it."""
    current = session.scalar(text("SELECT value FROM counter WHERE id = :id"), {"id": row})
    session.execute(
        text("UPDATE counter SET value = :v WHERE id = :id"), {"v": current + 1, "id": row}
    )


@pytest.mark.slow
def test_4_threads_x_100_serializable_increments_all_land(
    factory: DbSessionFactory,
    counters: Engine,
    other_connection: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dbsession")
    hooks = 0
    lock = threading.Lock()
    failures: list[BaseException] = []

    def counted() -> None:
        nonlocal hooks
        with lock:
            hooks += 1

    def one_increment(session: Session) -> None:
        increment(session)
        on_commit(counted)

    def worker() -> None:
        try:
            for _ in range(100):
                factory.transactional(
                    retry=RetryPolicy(attempts=200, base_delay=BASE, max_delay=CAP),
                    isolation_level="SERIALIZABLE",
                )(one_increment)()
        except BaseException as error:  # reported below, not lost in the thread
            failures.append(error)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert value(other_connection) == 400
    assert hooks == 400  # once per successful attempt, never for a retried one
    expected = {"postgresql": "SQLSTATE 40001", "mysql": "1213 deadlock"}
    backend = factory.url.get_backend_name()
    if backend in expected:  # SQLite's BEGIN IMMEDIATE queues writers: nothing to retry
        assert any(expected[backend] in line for line in retries(caplog))


@pytest.mark.backends("postgresql", "mysql")  # SQLite's BEGIN IMMEDIATE queues writers
def test_deadlock_between_two_threads_is_retried_and_both_complete(
    factory: DbSessionFactory,
    counters: Engine,
    other_connection: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dbsession")
    both_hold_one_row = threading.Barrier(2)
    completed: list[str] = []
    failures: list[BaseException] = []

    def cross(session: Session, first: int, second: int) -> None:
        session.execute(text("UPDATE counter SET value = value + 1 WHERE id = :id"), {"id": first})
        if not both_hold_one_row.broken:
            try:
                both_hold_one_row.wait(timeout=10)
            except threading.BrokenBarrierError:
                pass
        session.execute(text("UPDATE counter SET value = value + 1 WHERE id = :id"), {"id": second})
        on_commit(lambda: completed.append(f"{first}->{second}"))

    def worker(first: int, second: int) -> None:
        try:
            factory.transactional(retry=FIVE)(cross)(first, second)
        except BaseException as error:
            failures.append(error)
        finally:
            both_hold_one_row.abort()  # a retry never waits for the other thread again

    threads = [threading.Thread(target=worker, args=pair) for pair in [(1, 2), (2, 1)]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert sorted(completed) == ["1->2", "2->1"]
    assert value(other_connection, 1) == 2 and value(other_connection, 2) == 2
    logged = retries(caplog)
    # One deadlock victim retries; under load its retry can meet the other thread again.
    assert len(logged) >= 1
    assert all(("1213 deadlock" in line) or ("SQLSTATE 40P01" in line) for line in logged)


def _hold_sqlite_write_lock(path: str) -> sqlite3.Connection:
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def test_sqlite_busy_is_retried_until_the_lock_is_released(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dbsession")
    path = str(tmp_path / "busy.sqlite3")
    made = DbSessionFactory(f"sqlite:///{path}", sqlite_busy_timeout=0)
    holder = _hold_sqlite_write_lock(path)

    def add(session: Session) -> str:
        session.execute(text("CREATE TABLE IF NOT EXISTS t (name TEXT)"))
        session.execute(text("INSERT INTO t VALUES ('after the lock')"))
        return "done"

    try:
        with released_on_first_retry(holder.rollback):
            assert made.transactional(retry=THREE)(add)() == "done"
        logged = retries(caplog)
        assert len(logged) == 1 and "SQLITE_BUSY" in logged[0]
    finally:
        holder.close()
        made.dispose()


@pytest.mark.backends("mysql")
def test_mariadb_lock_wait_timeout_is_retried(
    factory: DbSessionFactory,
    counters: Engine,
    other_connection: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dbsession")

    def bump(session: Session) -> None:
        session.execute(text("SET SESSION innodb_lock_wait_timeout = 1"))
        session.execute(text("UPDATE counter SET value = value + 1 WHERE id = 1"))

    with other_connection.connect() as holder:
        holder.execute(text("UPDATE counter SET value = 10 WHERE id = 1"))  # row locked
        with released_on_first_retry(holder.commit):
            factory.transactional(retry=THREE)(bump)()
    logged = retries(caplog)
    assert len(logged) == 1 and "1205 lock wait timeout" in logged[0]
    assert value(other_connection) == 11


def test_retry_exhausted_is_a_named_error_chaining_the_last_one(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.sqlite3")
    made = DbSessionFactory(f"sqlite:///{path}", sqlite_busy_timeout=0)
    made.create_all(Base.metadata)
    holder = _hold_sqlite_write_lock(path)
    calls = 0

    def never_reached(session: Session) -> None:
        nonlocal calls
        calls += 1
        session.add(Supplier(name="x"))

    try:
        with pytest.raises(RetryExhaustedError, match="on each of 3 attempts") as caught:
            made.transactional(retry=THREE)(never_reached)()
        assert caught.value.attempts == 3
        assert isinstance(caught.value.__cause__, OperationalError)
        assert caught.value.last_error is caught.value.__cause__
        assert calls == 3
    finally:
        holder.close()
        made.dispose()


@pytest.mark.parametrize("error", [Boom("app error"), KeyboardInterrupt()])
def test_other_errors_are_never_retried(
    factory: DbSessionFactory, other_connection: Engine, error: BaseException
) -> None:
    calls = 0

    def failing(session: Session) -> None:
        nonlocal calls
        calls += 1
        session.add(Supplier(name="rolled back"))
        session.flush()
        raise error

    with pytest.raises(type(error)) as caught:
        factory.transactional(retry=RetryPolicy(attempts=5))(failing)()
    assert caught.value is error
    assert calls == 1
    with other_connection.connect() as conn:
        assert conn.scalar(text("SELECT COUNT(*) FROM supplier")) == 0


def test_database_errors_that_are_not_transient_are_not_retried(
    factory: DbSessionFactory,
) -> None:
    calls = 0

    def duplicate(session: Session) -> None:
        nonlocal calls
        calls += 1
        session.add_all([Supplier(name="dup"), Supplier(name="dup")])

    with pytest.raises(IntegrityError):
        factory.transactional(retry=RetryPolicy(attempts=5))(duplicate)()
    assert calls == 1
    with pytest.raises(ReadOnlyError):
        factory.transactional(retry=RetryPolicy(attempts=5), readonly=True)(duplicate)()
    assert calls == 2


def test_run_in_transaction_returns_the_result_and_commits(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    def add(session: Session, name: str) -> str:
        session.add(Supplier(name=name))
        return name.upper()

    assert factory.run_in_transaction(add, "acme") == "ACME"
    with other_connection.connect() as conn:
        assert conn.scalar(text("SELECT name FROM supplier")) == "acme"


def test_transactional_decorator_on_an_instance(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    @factory.transactional(retry=RetryPolicy(attempts=3))
    def add(session: Session, name: str, *, suffix: str = "") -> int:
        supplier = Supplier(name=name + suffix)
        session.add(supplier)
        session.flush()
        return supplier.id

    assert add("ACME", suffix=" Ltd") == 1
    assert add.__name__ == "add"
    with other_connection.connect() as conn:
        assert conn.scalar(text("SELECT name FROM supplier")) == "ACME Ltd"


def test_decorators_on_the_default_look_it_up_at_each_call(tmp_path: Path) -> None:
    @transactional()
    def count(session: Session) -> int:
        return int(session.scalar(text("SELECT COUNT(*) FROM supplier")) or 0)

    @transactional(readonly=True)
    def names(session: Session) -> list[str]:
        return list(session.scalars(text("SELECT name FROM supplier")))

    assert DbSessionFactory.registry.current is None  # decorating initialised nothing
    DbSessionFactory.global_init(f"sqlite:///{tmp_path}/d.sqlite3").create_all(Base.metadata)
    run_in_transaction(lambda session: session.add(Supplier(name="one")))
    default_factory().run_in_transaction(lambda session: session.add(Supplier(name="two")))
    assert count() == 2
    assert sorted(names()) == ["one", "two"]


@pytest.mark.parametrize("options", [{"attempts": 0}, {"base_delay": -1.0}, {"max_delay": -0.5}])
def test_bad_retry_options_are_configuration_errors(
    backend_url: URL, options: dict[str, float]
) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**options)  # type: ignore[arg-type]
