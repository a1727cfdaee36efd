"""Read-only transactions, which the database itself enforces, and their errors.

A read-only unit of work is the most frequent unit of a web app, so it costs what the
same read costs bare: no statement or round trip more than a writing unit's, and no
characteristic set and reset on every checkout (SQLAlchemy's ``postgresql_readonly``
does that: 1.22x the instructions of the same unit without it; benchmarks/RESULTS.md).

- Every backend: a read-only twin engine on the same database
  (:func:`install_read_only_twin`), with the same opinions and a pool of its own (the
  same size settings) whose connections are made read-only once, when opened:
  PostgreSQL with the driver's read-only flag (psycopg, psycopg2 and asyncpg then send
  ``BEGIN READ ONLY`` where they would send ``BEGIN``: no round trip, and safe behind a
  transaction pooler), MySQL/MariaDB ``SET SESSION TRANSACTION READ ONLY`` (PyMySQL's
  first statement starts each transaction, so there is no ``BEGIN`` to add ``READ ONLY``
  to: a ``START TRANSACTION READ ONLY`` per unit would be a round trip more than a writing
  unit's), SQLite ``PRAGMA query_only`` and a plain deferred ``BEGIN`` (WAL readers never
  wait). The factory's ``Binding`` builds the twin on first use and disposes it with the
  engine. Count its pool when sizing the server's connection limit.
- Another PostgreSQL driver: SQLAlchemy's ``postgresql_readonly`` on the engine's pool.

The backend's refusal of a write is raised as ReadOnlyError in a read-only scope, as
SQLitePathError for a SQLite file this process can only read, and as
DatabaseReadOnlyError for a server that is read-only (a standby, ``read_only``). The
guard of a read-only scope joined to a writing one, which the database cannot enforce,
is ``_guard``.
"""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Dialect, Engine, ExceptionContext
from sqlalchemy.pool import ConnectionPoolEntry, Pool

from ._classify import is_read_only_violation
from ._config import first_line, mask_url
from ._errors import DatabaseReadOnlyError, ReadOnlyError, SQLitePathError
from ._seam import set_driver_read_only
from ._sqlite import install_readers_only

#: Execution option of the engines of read-only scopes: the errors they raise are read
#: as a read-only scope's.
READONLY_OPTION = "dbsession_readonly"
#: PostgreSQL drivers whose own ``BEGIN`` carries the connection's read-only flag.
_FLAG_DRIVERS = ("psycopg", "psycopg2", "asyncpg")


def has_read_only_twin(dialect: Dialect) -> bool:
    """True if the read-only scopes on ``dialect`` run on a twin engine."""
    if dialect.name == "postgresql":
        return dialect.driver in _FLAG_DRIVERS
    return True


def readonly_options(dialect: Dialect) -> dict[str, Any]:
    """The execution options of a read-only scope's view of the engine: none on a twin
    (it has them), else SQLAlchemy's ``postgresql_readonly``."""
    if has_read_only_twin(dialect):
        return {}
    return {READONLY_OPTION: True, "postgresql_readonly": True}


#: Each built twin, by the dialect of the engine it is the twin of (shared by that engine's
#: views and never recreated, unlike its pool).
_twins: weakref.WeakKeyDictionary[Dialect, Engine] = weakref.WeakKeyDictionary()


def remember_twin(engine: Engine, twin: Engine) -> None:
    """Record that ``twin`` (built) is the read-only twin of ``engine``."""
    _twins[engine.dialect] = twin


def twin_of(engine: Engine) -> Engine | None:
    """The read-only twin built for ``engine`` (or a view of it), if any."""
    return _twins.get(engine.dialect)


def is_twin_pool(pool: Pool) -> bool:
    """True if ``pool`` is the pool of a read-only twin."""
    return any(twin.pool is pool for twin in list(_twins.values()))


def install_read_only_twin(engine: Engine) -> None:
    """Make ``engine`` a read-only twin: every connection read-only once, when opened
    (see the module docstring)."""
    engine.update_execution_options(**{READONLY_OPTION: True})
    dialect = engine.dialect
    if dialect.name == "postgresql":

        @event.listens_for(engine, "connect")
        def flag_read_only(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            set_driver_read_only(dialect, dbapi_connection, True)

        return
    if dialect.name == "sqlite":
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
