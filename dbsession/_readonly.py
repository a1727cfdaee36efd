"""Read-only transactions, which the database itself enforces, and their errors.

A read-only unit of work is the most frequent unit of a web app, so it costs what the
same read costs bare: no statement or round trip more than a writing unit's, and no
characteristic set and reset on every checkout (SQLAlchemy's ``postgresql_readonly``
does that: +33% instructions per unit).

- PostgreSQL (psycopg, psycopg2, asyncpg): a view of the engine (``_seam.flagged_view``)
  whose connections set the driver connection's read-only flag as their transaction
  begins (a local attribute: no round trip), so the driver's own ``BEGIN`` is
  ``BEGIN READ ONLY``; the flag is cleared when the connection goes back to the pool.
  Another driver: SQLAlchemy's ``postgresql_readonly``.
- MySQL/MariaDB and SQLite: a read-only twin engine on the same database
  (:func:`install_read_only_twin`), with the same opinions and a pool of its own (same
  size settings) whose connections are made read-only once, when opened: MySQL/MariaDB
  ``SET SESSION TRANSACTION READ ONLY`` (PyMySQL's first statement starts each
  transaction, so there is no ``BEGIN`` to add ``READ ONLY`` to: a
  ``START TRANSACTION READ ONLY`` per unit would be a round trip more than a writing
  unit's), SQLite ``PRAGMA query_only`` and a plain deferred ``BEGIN`` (WAL readers never
  wait). The factory's ``Binding`` builds the twin on first use and disposes it with the
  engine; read-only scopes there may hold up to the pool's size more connections.

The backend's refusal of a write is raised as ReadOnlyError in a read-only scope, as
SQLitePathError for a SQLite file this process can only read, and as
DatabaseReadOnlyError for a server that is read-only (a standby, ``read_only``). The
guard of a read-only scope joined to a writing one, which the database cannot enforce,
is ``_guard``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Dialect, Engine, ExceptionContext
from sqlalchemy.pool import ConnectionPoolEntry

from ._classify import is_read_only_violation
from ._config import first_line, mask_url
from ._errors import DatabaseReadOnlyError, ReadOnlyError, SQLitePathError
from ._seam import flagged_view, set_driver_read_only
from ._sqlite import install_readers_only

#: Execution option of the engines of read-only scopes: the errors they raise are read
#: as a read-only scope's.
READONLY_OPTION = "dbsession_readonly"
#: PostgreSQL drivers whose own ``BEGIN`` carries the connection's read-only flag.
_FLAG_DRIVERS = ("psycopg", "psycopg2", "asyncpg")
#: The flag of PostgreSQL's read-only view, and the pooled connection ``info`` key that
#: says its driver connection's read-only flag is set.
_READ_ONLY = "dbsession_read_only"
_FLAG_SET = "dbsession_read_only_set"


def has_read_only_twin(backend: str) -> bool:
    """True if the read-only scopes of ``backend`` run on a twin engine."""
    return backend in ("sqlite", "mysql", "mariadb")


def uses_driver_flag(dialect: Dialect) -> bool:
    """True if read-only scopes on ``dialect`` begin with the driver's read-only flag."""
    return dialect.name == "postgresql" and dialect.driver in _FLAG_DRIVERS


def readonly_options(dialect: Dialect) -> dict[str, Any]:
    """The execution options of a read-only scope's engine."""
    if dialect.name == "postgresql" and not uses_driver_flag(dialect):
        return {READONLY_OPTION: True, "postgresql_readonly": True}
    return {READONLY_OPTION: True}


def read_only_view(engine: Any) -> Any:
    """A view of the PostgreSQL ``engine`` (``Engine`` or ``AsyncEngine``) whose
    transactions begin ``READ ONLY``; the engine itself for another driver."""
    sync_engine: Engine = getattr(engine, "sync_engine", engine)
    if not uses_driver_flag(sync_engine.dialect):
        return engine
    view = flagged_view(sync_engine, _READ_ONLY, _begin_read_only)
    return view if sync_engine is engine else type(engine)(view)


def _begin_read_only(connection: Connection) -> None:
    pooled = connection.connection
    if _FLAG_SET not in pooled.info:
        set_driver_read_only(connection.dialect, pooled.dbapi_connection, True)
        pooled.info[_FLAG_SET] = True


def install_driver_read_only(engine: Engine) -> None:
    """Clear the driver's read-only flag that :func:`read_only_view` set when the
    connection goes back to the pool: the next transaction on it, whoever begins it and
    whatever its ``begin`` listeners run first, is read-write (a raw connection too)."""
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def read_write_again(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        if _FLAG_SET not in record.info or dbapi_connection is None:
            return
        try:
            set_driver_read_only(dialect, dbapi_connection, False)
        except Exception:  # an async connection returned with no event loop to run on
            record.invalidate(soft=True)  # replaced before its next use
            return
        del record.info[_FLAG_SET]


def install_read_only_twin(engine: Engine) -> None:
    """Make ``engine`` a read-only twin: every connection read-only once, when opened
    (see the module docstring)."""
    engine.update_execution_options(**{READONLY_OPTION: True})
    if engine.dialect.name == "sqlite":
        install_readers_only(engine)
        statement = "PRAGMA query_only=ON"
    else:
        statement = "SET SESSION TRANSACTION READ ONLY"

    @event.listens_for(engine, "connect")
    def read_only(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(statement)
        finally:
            cursor.close()


def install_read_only_errors(engine: Engine) -> None:
    """Raise the backend's refusal of a write as ReadOnlyError, SQLitePathError or
    DatabaseReadOnlyError (see the module docstring)."""

    @event.listens_for(engine, "handle_error")
    def read_only(context: ExceptionContext) -> BaseException | None:
        original = context.original_exception
        name = context.dialect.name
        if not is_read_only_violation(original, name):
            return None
        driver_says = f"{name}: {first_line(original, engine.url)}"
        if _in_read_only_scope(context.connection):
            return ReadOnlyError(
                f"A write was refused because the transaction is read-only ({driver_says}). "
                "session_scope(readonly=True) never writes: do this work in a writing "
                "scope, session_scope().",
                orig=original,
                statement=context.statement,
                params=context.parameters,
            )
        if name == "sqlite":
            return SQLitePathError(
                f"The SQLite database {engine.url.database!r} can only be read by this "
                f"process ({driver_says}): the file or its folder is not writable, or the "
                "URL opens it read-only (mode=ro, immutable=1). Fix the permissions or the URL.",
                orig=original,
                statement=context.statement,
                params=context.parameters,
            )
        return DatabaseReadOnlyError(
            f"The {name} server refused a write in a writing scope because the database "
            f"session is read-only ({driver_says}): the URL {mask_url(engine.url)} points at "
            "a read-only server (a hot standby or replica, MySQL read_only) or a role or "
            "database with default_transaction_read_only. Point it at the primary.",
            orig=original,
            statement=context.statement,
            params=context.parameters,
        )


def _in_read_only_scope(connection: Connection | None) -> bool:
    if connection is None:
        return False
    options = connection.get_execution_options()
    return bool(options.get(READONLY_OPTION))
