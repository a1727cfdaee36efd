"""Reading a database error: transient (worth retrying)? a write in a read-only transaction?

One table per backend, keyed by the code the driver reports: the SQLSTATE for
PostgreSQL (psycopg 3 ``sqlstate``, psycopg2 and asyncpg ``pgcode``), the server
error number for MySQL/MariaDB (``args[0]``), the primary result code for SQLite
(``sqlite_errorcode``; on Python 3.10, which lacks it, the message).
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy.exc import DBAPIError

#: Transient errors per backend: code -> what it means. A transaction that failed
#: with one of these may succeed when run again from the start.
TRANSIENT: Mapping[str, Mapping[str | int, str]] = {
    "postgresql": {"40001": "serialization failure", "40P01": "deadlock detected"},
    "mysql": {1213: "deadlock found", 1205: "lock wait timeout exceeded"},
    "sqlite": {"SQLITE_BUSY": "database is locked"},
}

#: The error each backend raises for a write inside a read-only transaction.
READ_ONLY: Mapping[str, str | int] = {
    "postgresql": "25006",
    "mysql": 1792,
    "sqlite": "SQLITE_READONLY",
}

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
