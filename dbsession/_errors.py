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
    │   └── MigrationsNotFoundError no Alembic migrations folder to run
    ├── DatabaseUnreachableError    the server did not accept a connection
    └── MigrationError              an Alembic command failed
        ├── UnknownRevisionError    no such revision in the migrations folder
        └── SchemaNotAtHeadError    the database is behind the newest revision

Errors of SQLAlchemy and the drivers that dbsession has nothing to add to
(an ``IntegrityError`` from a flush, say) pass through unchanged. No message
ever contains a password: URLs are always rendered masked.
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
            f"migrations head is {head}. Run 'dbsession upgrade' (or 'alembic upgrade head', "
            "or dbsession.migrations.upgrade()) before starting the app."
        )
