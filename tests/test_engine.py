"""Engine opinions: SQLite done right, fork safety, logging."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL

from dbsession import DbSessionFactory
from dbsession.example.models import Base, Supplier


@pytest.fixture
def sqlite_factory(tmp_path: Path) -> Iterator[DbSessionFactory]:
    factory = DbSessionFactory(f"sqlite:///{tmp_path / 'app.sqlite3'}")
    factory.create_all(Base.metadata)
    yield factory
    factory.dispose()


def pragma(factory: DbSessionFactory, name: str) -> object:
    with factory.engine.connect() as conn:
        return conn.exec_driver_sql(f"PRAGMA {name}").scalar()


def test_sqlite_foreign_keys_wal_and_busy_timeout(sqlite_factory: DbSessionFactory) -> None:
    assert pragma(sqlite_factory, "foreign_keys") == 1
    assert pragma(sqlite_factory, "journal_mode") == "wal"
    assert pragma(sqlite_factory, "busy_timeout") == 5000


def test_sqlite_busy_timeout_is_configurable(tmp_path: Path) -> None:
    factory = DbSessionFactory(f"sqlite:///{tmp_path / 'a.sqlite3'}", sqlite_busy_timeout=0.25)
    assert pragma(factory, "busy_timeout") == 250
    factory.dispose()


def test_an_autocommit_connection_commits_each_statement_by_itself(
    factory: DbSessionFactory,
) -> None:
    """What the errors recommend for work outside a transaction: closed without a
    commit, its statements stay (on SQLite, no BEGIN is sent for it)."""
    with factory.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("INSERT INTO supplier (name) VALUES ('auto')"))
    with factory.session_scope(readonly=True) as session:
        assert session.scalars(text("SELECT name FROM supplier")).all() == ["auto"]


def test_sqlite_write_scope_takes_the_write_lock_at_begin(
    sqlite_factory: DbSessionFactory, tmp_path: Path
) -> None:
    other = sqlite3.connect(tmp_path / "app.sqlite3", timeout=0, isolation_level=None)
    try:
        with sqlite_factory.session_scope() as session:
            session.execute(text("SELECT 1"))  # BEGIN IMMEDIATE, before any write
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()


def test_sqlite_savepoint_rolls_back_only_the_nested_part(
    sqlite_factory: DbSessionFactory,
) -> None:
    with sqlite_factory.session_scope() as session:
        session.add(Supplier(name="outer"))
        with pytest.raises(RuntimeError):
            with session.begin_nested():
                session.add(Supplier(name="inner"))
                session.flush()
                raise RuntimeError
    with sqlite_factory.session_scope() as session:
        assert session.query(Supplier.name).all() == [("outer",)]


def test_sqlite_transactional_ddl_rolls_back(sqlite_factory: DbSessionFactory) -> None:
    with pytest.raises(RuntimeError):
        with sqlite_factory.session_scope() as session:
            session.execute(text("CREATE TABLE scratch (x INTEGER)"))
            raise RuntimeError
    with sqlite_factory.engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM sqlite_master WHERE name='scratch'")) == 0


def write_from_threads(factory: DbSessionFactory, threads: int, scopes: int) -> list[Exception]:
    """Each thread commits ``scopes`` one-row scopes; return every error raised."""
    errors: list[Exception] = []

    def writer(worker: int) -> None:
        for i in range(scopes):
            try:
                with factory.session_scope() as session:
                    session.add(Supplier(name=f"w{worker}-{i}"))
            except Exception as error:  # "database is locked" would land here
                errors.append(error)

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return errors


def test_sqlite_8_threads_x_200_write_scopes_never_lock(
    sqlite_factory: DbSessionFactory,
) -> None:
    assert write_from_threads(sqlite_factory, threads=8, scopes=200) == []
    with sqlite_factory.session_scope() as session:
        assert session.query(Supplier).count() == 1600


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_is_one_database_across_threads(url: str) -> None:
    factory = DbSessionFactory(url)
    factory.create_all(Base.metadata)
    assert write_from_threads(factory, threads=4, scopes=50) == []
    with factory.session_scope() as session:
        assert session.query(Supplier).count() == 200
    factory.dispose()


def test_engine_creation_is_logged_with_the_masked_url(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dbsession")
    factory = DbSessionFactory("postgresql://app:hunter2@127.0.0.1:1/app")
    factory.engine.dispose()
    created = [r.getMessage() for r in caplog.records if r.name == "dbsession"]
    assert any("postgresql+psycopg://app:***@127.0.0.1:1/app" in m for m in created)
    assert "hunter2" not in caplog.text


def backend_pid(factory: DbSessionFactory) -> int:
    with factory.session_scope() as session:
        return int(session.scalar(text("SELECT pg_backend_pid()")) or 0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_forked_child_never_reuses_the_parents_connection(postgresql_url: URL) -> None:
    factory = DbSessionFactory(postgresql_url)
    parent_pid = backend_pid(factory)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.write(write_end, str(backend_pid(factory)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    child_backend = int(os.read(read_end, 64) or b"0")
    os.close(read_end)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_backend not in (0, parent_pid)
    assert backend_pid(factory) == parent_pid  # the parent's pooled connection still answers
    factory.dispose()
