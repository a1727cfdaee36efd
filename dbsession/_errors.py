"""The exceptions dbsession raises.

Every error is a :class:`DbSessionError`, so ``except DbSessionError`` catches
anything this package raises on its own account::

    DbSessionError
    ├── ConfigurationError          the settings cannot work; fix them and retry
    │   ├── InvalidURLError         empty or malformed database URL
    │   ├── UnknownDialectError     no such SQLAlchemy dialect or driver
    │   ├── MissingDriverError      the driver package is not installed
    │   ├── SQLitePathError         SQLite file folder missing or not writable
    │   ├── AlreadyInitializedError global_init() again with other settings
    │   ├── MigrationsNotFoundError no Alembic migrations folder to run
    │   └── UnsupportedIsolationLevelError  isolation level the backend does not have
    ├── DatabaseUnreachableError    the server did not accept a connection
    ├── DatabaseReadOnlyError       the server refused a write outside a read-only scope
    ├── MigrationError              an Alembic command failed
    │   ├── UnknownRevisionError    no such revision in the migrations folder
    │   └── SchemaNotAtHeadError    the database is behind the newest revision
    ├── ScopeError                  a scope used in a way that cannot work
    │   └── NoActiveScopeError      current_session()/on_commit() outside any scope
    ├── ReadOnlyError               a write inside session_scope(readonly=True)
    └── RetryExhaustedError         run_in_transaction gave up; chains the last error

A ``ReadOnlyError`` replaces the backend's own error (PostgreSQL SQLSTATE
25006, MySQL/MariaDB 1792, SQLite SQLITE_READONLY) inside a read-only scope;
in a writing scope the same error is a ``DatabaseReadOnlyError`` (a read-only
server, role or database) or, for SQLite, a ``SQLitePathError``. The driver's
exception stays reachable as the ``__cause__``. Errors of SQLAlchemy and the drivers
that dbsession has nothing to add to (an ``IntegrityError`` from a flush, say)
pass through unchanged. No message ever contains a password: URLs are always
rendered masked.
"""

from __future__ import annotations


class DbSessionError(Exception):
    """Base class of every error raised by dbsession."""


class ConfigurationError(DbSessionError):
    """The configuration cannot work; the message says which setting to fix."""


class InvalidURLError(ConfigurationError):
    """The database URL is empty or cannot be parsed."""


class UnknownDialectError(ConfigurationError):
    """The URL names a database dialect or driver SQLAlchemy does not know."""


class MissingDriverError(ConfigurationError):
    """The DBAPI driver the URL needs is not installed."""


class SQLitePathError(ConfigurationError):
    """The SQLite database file cannot be created or written where the URL points."""


class AlreadyInitializedError(ConfigurationError):
    """The factory is already initialised with a different URL or options."""


class DatabaseUnreachableError(DbSessionError):
    """A connection to the database server could not be opened."""


class DatabaseReadOnlyError(DbSessionError):
    """The server refused a write in a writing scope: it, the role or the database is
    read-only (a hot standby, ``default_transaction_read_only``, MySQL ``read_only``)."""


class UnsupportedIsolationLevelError(ConfigurationError):
    """The isolation level asked of a scope is not one the backend supports."""


class ScopeError(DbSessionError):
    """A scope was asked for something it cannot do (say, a savepoint changing read-only-ness)."""


class NoActiveScopeError(ScopeError):
    """``current_session()`` or ``on_commit()`` was called outside any ``session_scope()``."""


class ReadOnlyError(DbSessionError):
    """A statement tried to write inside a read-only transaction.

    The driver's exception (PostgreSQL 25006, MySQL/MariaDB 1792, SQLite
    SQLITE_READONLY) is the ``__cause__``.
    """


class RetryExhaustedError(DbSessionError):
    """A transient failure persisted through every attempt of ``run_in_transaction``.

    ``attempts`` is how many were made; the last error is ``last_error`` and the
    ``__cause__``.
    """

    def __init__(self, message: str, *, attempts: int, last_error: BaseException) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_error = last_error


class MigrationsNotFoundError(ConfigurationError):
    """No Alembic configuration or migrations folder was found where dbsession looked."""


class MigrationError(DbSessionError):
    """An Alembic migration command failed; the message says which and why."""


class UnknownRevisionError(MigrationError):
    """The revision named does not exist in the migrations folder."""


class SchemaNotAtHeadError(MigrationError):
    """The database schema is not at the newest migration revision."""

    def __init__(self, current: str | None, head: str) -> None:
        self.current = current
        self.head = head
        super().__init__(
            f"The database schema is at revision {current or '<base> (empty)'} but the "
            f"migrations head is {head}. Run 'dbsession upgrade' (or "
            "dbsession.migrations.upgrade()) before starting the app."
        )
