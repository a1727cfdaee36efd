"""Read-only transactions, which the database itself enforces, and their errors.

- PostgreSQL: SQLAlchemy's ``postgresql_readonly`` execution option.
- MySQL/MariaDB: ``START TRANSACTION READ ONLY`` from a ``begin`` listener on the read-only
  view only (on the engine it would send every statement of every scope through
  SQLAlchemy's event dispatch: +12% instructions per unit of work on MariaDB).
- SQLite: a read-only twin engine on the same database (:func:`make_twin`), with the same
  opinions and a pool of its own whose connections are set ``PRAGMA query_only`` once,
  when opened. A read-only scope there costs a plain deferred ``BEGIN`` and nothing else
  (WAL readers never wait). The factory's ``Binding`` builds it on first use and disposes
  it with the engine.

The backend's refusal of a write is raised as ReadOnlyError in a read-only scope, as
SQLitePathError for a SQLite file this process can only read, and as
DatabaseReadOnlyError for a server that is read-only (a standby, ``read_only``). The
guard of a read-only scope joined to a writing one, which the database cannot enforce,
is ``_guard``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, ExceptionContext
from sqlalchemy.pool import ConnectionPoolEntry

from ._classify import is_read_only_violation
from ._config import first_line, mask_url
from ._errors import DatabaseReadOnlyError, ReadOnlyError, SQLitePathError
from ._sqlite import install_readers_only

#: Execution option of the engines of read-only scopes (MySQL/MariaDB views, SQLite's
#: read-only twin): the errors they raise are read as a read-only scope's.
READONLY_OPTION = "dbsession_readonly"


def readonly_options(dialect_name: str) -> dict[str, Any]:
    """The execution options of a read-only scope's engine."""
    return {"postgresql_readonly" if dialect_name == "postgresql" else READONLY_OPTION: True}


def install_query_only(engine: Engine) -> None:
    """Make ``engine`` a read-only twin: its transactions are readers, its connections
    ``query_only``."""
    install_readers_only(engine)
    engine.update_execution_options(**{READONLY_OPTION: True})

    @event.listens_for(engine, "connect")
    def query_only(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA query_only=ON")
        finally:
            cursor.close()


def install_mysql_read_only(view: Engine) -> None:
    """Begin the transactions of a MySQL/MariaDB read-only ``view`` READ ONLY."""

    @event.listens_for(view, "begin")
    def begin(connection: Connection) -> None:
        connection.exec_driver_sql("START TRANSACTION READ ONLY")


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
    return bool(options.get(READONLY_OPTION) or options.get("postgresql_readonly"))
