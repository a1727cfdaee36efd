"""Every error dbsession translates is still an instance of the SQLAlchemy class it
replaces, raised through the real path: ``except OperationalError`` / ``except
IntegrityError`` / ``except DBAPIError`` written against plain SQLAlchemy keeps working."""

from __future__ import annotations

import inspect
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection
from sqlalchemy.pool import NullPool

from dbsession import DbSessionFactory, Timeouts, bulk_insert
from dbsession import errors as public
from dbsession.example.models import Supplier

Trigger = Callable[[URL, Path], None]


def _unreachable(url: URL, tmp: Path) -> None:
    factory = DbSessionFactory(url.set(host="127.0.0.1", port=1), timeouts=Timeouts(connect=2))
    try:
        with factory.session_scope() as session:
            session.execute(text("SELECT 1"))
    finally:
        factory.dispose()


def _killed(url: URL, tmp: Path, *, at_commit: bool = False) -> None:
    """The server ends this scope's session (before a statement, or just before COMMIT)."""
    admin = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    factory = DbSessionFactory(url)

    def kill(connection: Connection) -> None:
        pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with admin.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    try:
        if at_commit:
            event.listen(factory.engine, "commit", kill)
        with factory.session_scope() as session:
            session.execute(text("SELECT 1"))
            if not at_commit:
                kill(session.connection())
                session.execute(text("SELECT 1"))
    finally:
        factory.dispose()
        admin.dispose()


def _timed_out(url: URL, tmp: Path) -> None:
    factory = DbSessionFactory(url)
    try:
        with factory.session_scope(timeout=0.5) as session:
            session.execute(text("SELECT pg_sleep(3)"))
    finally:
        factory.dispose()


def _sqlite_read_only_file(url: URL, tmp: Path) -> None:
    path = tmp / "ro.sqlite3"
    sqlite3.connect(path).close()  # the file exists; the URL opens it read-only
    factory = DbSessionFactory(f"sqlite:///file:{path}?mode=ro&uri=true")
    try:
        with factory.session_scope() as session:
            session.execute(text("CREATE TABLE t (x INTEGER)"))
    finally:
        factory.dispose()


def _read_only_server(url: URL, tmp: Path) -> None:
    """A writing scope on a session the server keeps read-only (as on a hot standby)."""
    read_only = url.update_query_dict({"options": "-c default_transaction_read_only=on"})
    factory = DbSessionFactory(read_only)
    try:
        with factory.session_scope() as session:
            session.execute(text("CREATE TABLE refused (x INTEGER)"))
    finally:
        factory.dispose()


def _read_only_scope(url: URL, tmp: Path) -> None:
    factory = DbSessionFactory(url)
    try:
        with factory.session_scope(readonly=True) as session:
            session.execute(text("CREATE TABLE refused (x INTEGER)"))
    finally:
        factory.dispose()


def _pool_exhausted(url: URL, tmp: Path) -> None:
    factory = DbSessionFactory(url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    caught: list[BaseException] = []

    def second() -> None:
        try:
            with factory.session_scope() as session:
                session.execute(text("SELECT 1"))
        except BaseException as error:
            caught.append(error)

    try:
        with factory.session_scope() as holder:
            holder.execute(text("SELECT 1"))
            thread = threading.Thread(target=second)
            thread.start()
            thread.join()
    finally:
        factory.dispose()
    raise caught[0]


def _duplicate_row(url: URL, tmp: Path) -> None:
    factory = DbSessionFactory(url)
    table = Supplier.metadata.tables["supplier"]
    table.create(factory.engine)
    try:
        with factory.session_scope() as session:
            bulk_insert(session, Supplier, [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
    finally:
        table.drop(factory.engine)
        factory.dispose()


def _caught_and_carried_on(url: URL, tmp: Path) -> None:
    factory = DbSessionFactory(url)
    table = Supplier.metadata.tables["supplier"]
    table.create(factory.engine)
    try:
        with factory.session_scope() as session:
            session.execute(text("INSERT INTO supplier (id, name) VALUES (1, 'a')"))
            try:
                session.execute(text("INSERT INTO supplier (id, name) VALUES (1, 'b')"))
            except sa_exc.IntegrityError:
                pass  # the app carries on: the scope refuses to commit
    finally:
        table.drop(factory.engine)
        factory.dispose()


def _galera(url: URL, tmp: Path) -> None:  # pragma: no cover (a cluster fixture's test)
    raise AssertionError("raised by tests/test_cluster_galera.py on a real cluster")


#: Each class of dbsession.errors that replaces a SQLAlchemy error: the SQLAlchemy class
#: it must still be, and how the real path raises it.
TRANSLATED: dict[type[BaseException], tuple[type[BaseException], Trigger]] = {
    public.DatabaseUnreachableError: (sa_exc.OperationalError, _unreachable),
    public.ConnectionLostError: (sa_exc.OperationalError, _killed),
    public.CommitOutcomeUnknownError: (
        sa_exc.OperationalError,
        lambda url, tmp: _killed(url, tmp, at_commit=True),
    ),
    public.ScopeTimeoutError: (sa_exc.OperationalError, _timed_out),
    public.SQLitePathError: (sa_exc.OperationalError, _sqlite_read_only_file),
    public.DatabaseReadOnlyError: (sa_exc.DBAPIError, _read_only_server),
    public.ReadOnlyError: (sa_exc.DBAPIError, _read_only_scope),
    public.PoolExhaustedError: (sa_exc.TimeoutError, _pool_exhausted),
    public.BulkInsertError: (sa_exc.IntegrityError, _duplicate_row),
    public.NeedsRollbackError: (sa_exc.PendingRollbackError, _caught_and_carried_on),
    public.MigrationBlockedError: (sa_exc.OperationalError, _galera),
    public.ClusterUnavailableError: (sa_exc.OperationalError, _galera),
    public.SQLiteWriteLockTimeoutError: (sa_exc.OperationalError, _galera),
}
#: Raised through their real path by the tests named (a cluster, a stuck writer, a lock held
#: under a migration).
ELSEWHERE = {
    public.ClusterUnavailableError,  # tests/test_cluster_galera.py, on a real cluster
    public.SQLiteWriteLockTimeoutError,  # tests/test_sqlite_gate.py
    public.MigrationBlockedError,  # tests/test_migration_safety_lockwait.py
}


def test_every_class_that_replaces_a_sqlalchemy_error_is_listed() -> None:
    translated = {
        value
        for value in vars(public).values()
        if inspect.isclass(value)
        and issubclass(value, sa_exc.SQLAlchemyError)
        and issubclass(value, public.DbSessionError)
        and value.__name__ in public.__all__
    }
    # BulkInsertError is also raised for bad input; only its database refusals are DBAPIErrors
    assert translated | {public.BulkInsertError} == set(TRANSLATED)
    for cls, (base, _) in TRANSLATED.items():
        assert issubclass(cls, public.DbSessionError), cls
        assert issubclass(cls, base) or cls is public.BulkInsertError, cls
    assert "DatabaseReadOnlyError" in public.__all__
    assert issubclass(public.DatabaseReadOnlyError, sa_exc.DBAPIError)


@pytest.mark.parametrize(
    "cls", [cls for cls in TRANSLATED if cls not in ELSEWHERE], ids=lambda cls: cls.__name__
)
def test_the_real_path_raises_an_instance_of_the_sqlalchemy_class(
    cls: type[BaseException], postgresql_url: URL, tmp_path: Path
) -> None:
    base, trigger = TRANSLATED[cls]
    with pytest.raises(cls) as raised:
        trigger(postgresql_url, tmp_path)
    assert isinstance(raised.value, base) and isinstance(raised.value, public.DbSessionError)
    try:  # the way code written against plain SQLAlchemy catches it
        raise raised.value
    except base:
        pass


@pytest.mark.backends("sqlite", "mysql")
def test_a_refused_bulk_row_is_an_integrity_error_on_every_backend(backend_url: URL) -> None:
    with pytest.raises(sa_exc.IntegrityError) as raised:
        _duplicate_row(backend_url, Path())
    assert isinstance(raised.value, public.BulkInsertError)
    assert raised.value.orig is not None and raised.value.__cause__ is not None


def test_a_bulk_input_error_is_not_a_database_error() -> None:
    factory = DbSessionFactory("sqlite://")
    try:
        with pytest.raises(public.BulkInsertError) as raised:
            with factory.session_scope() as session:
                bulk_insert(session, Supplier, [{"nope": 1}])
        assert not isinstance(raised.value, sa_exc.SQLAlchemyError)
    finally:
        factory.dispose()
