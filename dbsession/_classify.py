"""Reading a database error: transient (worth retrying)? a write in a read-only transaction?

One table per backend, keyed by the code the driver reports: the SQLSTATE for
PostgreSQL (psycopg 3 ``sqlstate``, psycopg2 and asyncpg ``pgcode``), the server
error number for MySQL/MariaDB (``args[0]``), the primary result code for SQLite
(``sqlite_errorcode``; on Python 3.10, which lacks it, the message).
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import event
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.exc import DBAPIError

from ._config import first_line
from ._errors import ClusterUnavailableError

#: Transient errors per backend: code -> what it means. A transaction that failed
#: with one of these may succeed when run again from the start.
TRANSIENT: Mapping[str, Mapping[str | int, str]] = {
    "postgresql": {"40001": "serialization failure", "40P01": "deadlock detected"},
    "mysql": {
        1213: "deadlock found",
        1205: "lock wait timeout exceeded",
        1020: "record changed since it was read (snapshot isolation conflict)",
        1047: "cluster node not ready (not in the primary component)",
        1180: "error during COMMIT (the node left the cluster's primary component)",
    },
    "sqlite": {"SQLITE_BUSY": "database is locked"},
}

#: The error each backend raises for a write inside a read-only transaction.
READ_ONLY: Mapping[str, str | int] = {
    "postgresql": "25006",
    "mysql": 1792,
    "sqlite": "SQLITE_READONLY",
}

#: MariaDB Galera: the node cannot take transactions now (it left, or has not yet
#: joined, the primary component of the cluster); the transaction did not commit.
CLUSTER_UNAVAILABLE: frozenset[int] = frozenset({1047, 1180})

#: What a driver says when a server cannot be reached right now but may be soon: it is
#: down, restarting, being promoted or demoted (a failover), or none of a multi-host
#: URL's servers is a primary yet. A wrong password, database or host name is not here.
_CONNECT_TRANSIENT = (
    "connection refused",
    "connection reset",
    "server closed the connection",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is not yet accepting connections",
    "the database system is in recovery mode",
    "hot standby",
    "is read-only",
    "timeout expired",
    "timed out",
    "no route to host",
    "can't connect to mysql server",
    "lost connection to mysql server",
    "server has gone away",
    "wsrep has not yet prepared node",
)

_SQLITE_PRIMARY = {5: "SQLITE_BUSY", 8: "SQLITE_READONLY"}
_SQLITE_MESSAGES = {
    "database is locked": "SQLITE_BUSY",
    "attempt to write a readonly database": "SQLITE_READONLY",
}


def backend_of(dialect_name: str) -> str:
    """The key of the tables above for a SQLAlchemy dialect name (``mariadb`` is ``mysql``)."""
    return "mysql" if dialect_name == "mariadb" else dialect_name


def error_code(error: BaseException, backend: str) -> str | int | None:
    """The backend's code for a SQLAlchemy DBAPIError (or a bare DBAPI error), else None."""
    original = error.orig if isinstance(error, DBAPIError) else error
    if original is None:
        return None
    if backend == "postgresql":
        code = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
        return str(code) if code else None
    if backend == "mysql":
        args = getattr(original, "args", ())
        return args[0] if args and isinstance(args[0], int) else None
    if backend == "sqlite":
        number = getattr(original, "sqlite_errorcode", None)
        if isinstance(number, int):
            return _SQLITE_PRIMARY.get(number & 0xFF, number)
        return _SQLITE_MESSAGES.get(str(original).strip().lower())
    return None


def transient_reason(error: BaseException, dialect_name: str) -> str | None:
    """Describe ``error`` if it is transient on this backend (e.g. ``SQLSTATE 40001
    serialization failure``); None for every other error, which must not be retried."""
    if not isinstance(error, DBAPIError):
        return None
    backend = backend_of(dialect_name)
    code = error_code(error, backend)
    meaning = TRANSIENT.get(backend, {}).get(code) if code is not None else None
    if meaning is None:
        return None
    label = "SQLSTATE " if backend == "postgresql" else ""
    return f"{label}{code} {meaning}"


def is_read_only_violation(error: BaseException, dialect_name: str) -> bool:
    """True if ``error`` is the backend refusing a write in a read-only transaction."""
    backend = backend_of(dialect_name)
    expected = READ_ONLY.get(backend)
    return expected is not None and error_code(error, backend) == expected


def is_cluster_unavailable(error: BaseException, dialect_name: str) -> bool:
    """True if ``error`` is a Galera node refusing work because it is outside the
    cluster's primary component (1047, 1180): the transaction did not commit."""
    backend = backend_of(dialect_name)
    return backend == "mysql" and error_code(error, backend) in CLUSTER_UNAVAILABLE


def connect_transient_reason(message: str) -> str | None:
    """The clue in a failed connect's ``message`` that the server may accept connections
    soon (refused, reset, starting up, no primary among the hosts yet), else None."""
    lowered = message.lower()
    return next((clue for clue in _CONNECT_TRANSIENT if clue in lowered), None)


def install_cluster_errors(engine: Engine, describe: str) -> None:
    """Raise ClusterUnavailableError for Galera's 1047 / 1180 on ``engine`` (``describe``:
    which server, masked, for the message); other errors pass on unchanged."""

    @event.listens_for(engine, "handle_error")
    def cluster(context: ExceptionContext) -> BaseException | None:
        original = context.original_exception
        if not is_cluster_unavailable(original, context.dialect.name):
            return None
        return ClusterUnavailableError(
            f"The cluster node {describe} cannot take transactions now "
            f"({context.dialect.name}: {first_line(original, engine.url)}): it is not part of "
            "the cluster's primary component (a node left, or quorum was lost). Nothing was "
            "committed; run_in_transaction runs the unit again, on a node that can take it "
            "if the URL or a proxy in front offers one.",
            statement=context.statement,
            params=context.parameters,
            orig=original,
        )
