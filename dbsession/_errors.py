"""The exceptions dbsession raises.

Every error is a :class:`DbSessionError`, so ``except DbSessionError`` catches
anything this package raises on its own account::

    DbSessionError
    ├── ConfigurationError          the settings cannot work; fix them and retry
    │   ├── InvalidURLError         empty or malformed database URL
    │   ├── UnknownDialectError     no such SQLAlchemy dialect or driver
    │   ├── MissingDriverError      the driver package is not installed
    │   ├── SQLitePathError         SQLite file folder missing or not writable (also an
    │   │                           SQLAlchemy OperationalError)
    │   ├── AlreadyInitializedError global_init() again with other settings
    │   ├── NotInitializedError     the process default was disposed and not set up again
    │   ├── MigrationsNotFoundError no Alembic migrations folder to run
    │   └── UnsupportedIsolationLevelError  isolation level the backend does not have
    ├── DatabaseUnreachableError    the server did not accept a connection (also an
    │   │                           sqlalchemy.exc.OperationalError)
    │   └── ConnectionLostError     an open connection broke under a transaction
    │       └── CommitOutcomeUnknownError  it broke during COMMIT: committed or not, unknown
    ├── DatabaseReadOnlyError       the server refused a write outside a read-only scope
    │                               (also a sqlalchemy.exc.DBAPIError)
    ├── ClusterUnavailableError     a Galera node outside the primary component (1047, 1180)
    │                               (also an SQLAlchemy OperationalError)
    ├── ReplicaLagError             session_scope(replica=True) and the replica is too far
    │                               behind (or not streaming): not served by the primary
    ├── ScopeTimeoutError           a statement or lock wait overran session_scope(timeout=)
    │                               (also a SQLAlchemy OperationalError)
    ├── MigrationError              an Alembic command failed
    │   ├── MigrationLockTimeoutError  another process held the migration lock too long
    │   ├── MigrationBlockedError   a migration statement never got its table lock: another
    │   │                           session's transaction held it through every attempt
    │   │                           (also a sqlalchemy.exc.OperationalError)
    │   ├── UnknownRevisionError    no such revision in the migrations folder
    │   └── SchemaNotAtHeadError    the database is behind the newest revision
    ├── ScopeError                  a scope used in a way that cannot work
    │   ├── NoActiveScopeError      current_session()/on_commit() outside any scope
    │   ├── TransactionAbortedError the outer transaction was lost inside a savepoint;
    │   │   │                       the unit of work refuses to commit
    │   │   └── NeedsRollbackError  a database error was caught inside the scope, or
    │   │                           session.rollback() called: it refuses to commit (also
    │   │                           a sqlalchemy.exc.PendingRollbackError)
    │   ├── DatabaseBlockedError    under the pytest plugin: the process default used by
    │   │                           a test that did not ask for the database
    │   └── SharedConnectionError   under the pytest plugin: another thread or a concurrent
    │                               task asked for the test's one connection
    ├── PoolExhaustedError          no pooled connection free in time; names the holders
    │                               (also a sqlalchemy.exc.TimeoutError)
    ├── SQLiteWriteLockTimeoutError the SQLite write gate did not move for 2x the busy timeout
    │                               (also an SQLAlchemy OperationalError; retried as SQLITE_BUSY)
    ├── ReadOnlyError               a write inside session_scope(readonly=True) (also a
    │                               sqlalchemy.exc.DBAPIError)
    ├── BulkInsertError             bulk_insert() got a row it (or the database) refuses;
    │                               a database refusal is also the SQLAlchemy class it
    │                               replaces (IntegrityError for a constraint, ...)
    └── RetryExhaustedError         run_in_transaction gave up; chains the last error

A ``ReadOnlyError`` replaces the backend's own error (PostgreSQL SQLSTATE
25006, MySQL/MariaDB 1792, SQLite SQLITE_READONLY) inside a read-only scope;
in a writing scope the same error is a ``DatabaseReadOnlyError`` (a read-only
server, role or database) or, for SQLite, a ``SQLitePathError``. The driver's
exception stays reachable as the ``__cause__``. Errors of SQLAlchemy and the drivers
that dbsession has nothing to add to (an ``IntegrityError`` from a flush, say)
pass through unchanged. No message ever contains a password: URLs are always
rendered masked.

Where dbsession replaces a SQLAlchemy error with its own, the new one is still an
instance of the SQLAlchemy class it replaces, so ``except OperationalError`` written
against plain SQLAlchemy keeps working: ``DatabaseUnreachableError``, ``SQLitePathError`` and
``ClusterUnavailableError`` are ``sqlalchemy.exc.OperationalError``, ``ReadOnlyError`` and
``DatabaseReadOnlyError`` are ``sqlalchemy.exc.DBAPIError``, and a ``BulkInsertError`` the
database caused is the class of the error it replaces (an ``IntegrityError`` for a
constraint).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc

if TYPE_CHECKING:
    from ._lockwait import Blocker


class DbSessionError(Exception):
    """Base class of every error raised by dbsession."""


class ConfigurationError(DbSessionError):
    """The configuration cannot work; the message says which setting to fix.

    When: an option value that cannot work, named when configured (``global_init()`` or
    ``DbSessionFactory()``), not at the first scope: ``sqlite_busy_timeout`` NaN, infinite,
    negative or not a number; ``expire_on_commit="no"``; ``connect_args`` not a dict; an
    unknown engine option (``pool_sise=5``); an async driver on the sync side
    (``sqlite+aiosqlite`` in ``DbSessionFactory``); at connect, a connection option the driver
    refuses (``?connect_timeout=abc``, ``?bogus=1``, MySQL ``?charset=bogus``,
    ``connect_args={"bogus": 1}``) or ignores (``sqlite:///x.db?bogus=1``). Fix: the setting
    or option the message names.
    """


class InvalidURLError(ConfigurationError):
    """The database URL is empty or cannot be parsed.

    When: an empty URL (argument, ``--url``, ``DATABASE_URL``); a URL that does not parse; an
    unencoded ``@`` in the password or ``/`` in the user name (part of the password would be
    read as the host or database); a SQLite URL with a user or host; ``bytes`` given as the
    URL. Fix: ``dialect+driver://user:password@host:port/dbname``, user and password
    percent-encoded (``urllib.parse.quote(password, safe='')``); a ``pathlib.Path`` is accepted
    as a SQLite file.
    """


class UnknownDialectError(ConfigurationError):
    """The URL names a database dialect or driver SQLAlchemy does not know.

    When: ``oracle9x://``, ``postgresql+nosuchdriver://``. Fix: one of sqlite,
    postgresql+psycopg, mysql+pymysql, mariadb+pymysql.
    """


class MissingDriverError(ConfigurationError):
    """The DBAPI driver the URL needs is not installed.

    When: the driver is not installed. Fix: the message names the package.
    """


class AlreadyInitializedError(ConfigurationError):
    """The factory is already initialised with a different URL or options.

    When: ``global_init()`` again with another URL or other options. Fix: call it before the
    first use, or ``dispose()`` first.
    """


class _TranslatedDBAPIError(sa_exc.DBAPIError):
    """A driver error that dbsession re-words: the message is dbsession's own line, the
    driver's exception stays reachable as ``orig`` (and as ``__cause__`` where chained)."""

    args: tuple[Any, ...]

    def __init__(
        self,
        message: str,
        *,
        orig: BaseException | None = None,
        statement: str | None = None,
        params: Any = None,
        connection_invalidated: bool = False,
    ) -> None:
        super().__init__(
            statement,
            params,
            orig,  # type: ignore[arg-type]  # None: dbsession's own refusal, no driver error
            connection_invalidated=connection_invalidated,
        )
        self.message: str = message
        self.args = (message,)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type[_TranslatedDBAPIError], tuple[str]]:
        return type(self), (self.message,)


class DatabaseUnreachableError(DbSessionError, _TranslatedDBAPIError, sa_exc.OperationalError):
    """A connection to the database server could not be opened.

    When: the server refused, timed out, or refused the user or database (a database that does
    not exist). Fix: the message names host, port, database, user and the setting the URL came
    from (``argument``, ``DATABASE_URL``, ``replica_url``; ``--dbsession-url`` in the pytest
    plugin).
    """


class ConnectionLostError(DatabaseUnreachableError):
    """An open connection broke mid-transaction (a killed server session, a pooler that
    dropped it, a peer silent past the timeouts); the transaction did not commit.

    When: an open connection broke mid-transaction (killed session, a pooler that dropped it, a
    peer silent past the timeouts); nothing was committed. Fix: run the unit with
    ``run_in_transaction``, which retries it; see docs/deploying.md.
    """


class CommitOutcomeUnknownError(ConnectionLostError):
    """The connection broke while COMMIT was in flight: the transaction may or may not have
    committed. ``run_in_transaction`` retries it only for ``RetryPolicy(idempotent=True)``.

    When: the connection broke while ``COMMIT`` was in flight: the outcome is unknown. Fix:
    check, or make the unit idempotent and pass ``retry=RetryPolicy(idempotent=True)``
    (docs/deploying.md).
    """


class ScopeTimeoutError(DbSessionError, _TranslatedDBAPIError, sa_exc.OperationalError):
    """A statement or lock wait overran ``session_scope(timeout=...)``; the scope rolled back.

    Also a SQLAlchemy ``OperationalError`` (the error it replaces); the driver's is ``orig``.

    When: a statement or lock wait overran ``session_scope(timeout=..)``. Fix: a bigger
    ``timeout=``, a faster query, or less lock contention.
    """


class SQLitePathError(ConfigurationError, _TranslatedDBAPIError, sa_exc.OperationalError):
    """The SQLite database file cannot be created or written where the URL points.

    Also a SQLAlchemy ``OperationalError``: plain SQLAlchemy reports the same problem as
    SQLite's "unable to open database file" or "attempt to write a readonly database".

    When: the SQLite file's folder does not exist or is not writable (also for an existing
    file: WAL creates ``-wal`` and ``-shm`` beside it); a write refused because the file or
    folder is read-only or the URL says ``mode=ro``. Fix: create the folder, fix permissions,
    or point the URL elsewhere.
    """


class DatabaseReadOnlyError(DbSessionError, _TranslatedDBAPIError):
    """The server refused a write in a writing scope: it, the role or the database is
    read-only (a hot standby, a primary demoted by a failover, ``default_transaction_read_only``,
    MySQL ``read_only``). Also a SQLAlchemy ``DBAPIError``. ``run_in_transaction`` retries
    the unit on a fresh connection (the pool is emptied so the next connect finds the new
    primary).

    When: the server refused a write in a **writing** scope: a hot standby, a replica, MySQL
    ``read_only``, a role or database with ``default_transaction_read_only``. Fix: point the
    URL at the primary, or at a writable role; after a failover (a demoted primary)
    ``run_in_transaction`` empties the pool and retries.
    """


class ClusterUnavailableError(DbSessionError, _TranslatedDBAPIError, sa_exc.OperationalError):
    """The cluster cannot take this transaction now: a Galera node that is not part of the
    primary component (MariaDB 1047 "WSREP has not yet prepared node", 1180 at COMMIT, no
    quorum). The transaction did not commit; ``run_in_transaction`` retries it. Also a
    SQLAlchemy ``OperationalError``; the driver's error is ``orig``.

    When: a Galera node outside the primary component refused the transaction (MariaDB 1047,
    1180 at COMMIT): a node left, quorum lost; nothing was committed. Fix:
    ``run_in_transaction`` retries it within its budget; restore quorum, or point the client at
    a node of the primary component (docs/deploying.md).
    """


class ReplicaLagError(DbSessionError):
    """``session_scope(replica=True)`` insists on the replica, and the replica is further
    behind than ``max_replica_lag`` (or its WAL receiver is not streaming, or it cannot
    be asked): dbsession does not quietly read the primary instead.

    When: ``session_scope(readonly=True, replica=True)`` while the replica is further behind
    than ``max_replica_lag``, or not streaming. Fix: leave ``replica=`` unset to read the
    primary meanwhile, or retry later.
    """


class UnsupportedIsolationLevelError(ConfigurationError):
    """The isolation level asked of a scope is not one the backend supports.

    When: an isolation level the backend does not have. Fix: one of those the message lists.
    """


class ScopeError(DbSessionError):
    """A scope was asked for what it cannot do (a joined scope changing the isolation level).

    When: a savepoint asked to change read-only-ness or isolation. Fix: open an independent
    scope.
    """


class NoActiveScopeError(ScopeError):
    """``current_session()`` or ``on_commit()`` was called outside any ``session_scope()``.

    When: ``current_session()`` or ``on_commit()`` outside any scope. Fix: call it inside a
    scope.
    """


class SQLiteWriteLockTimeoutError(DbSessionError, _TranslatedDBAPIError, sa_exc.OperationalError):
    """An SQLite writer waited for the database's write gate while one and the same
    transaction of this process held it for twice the busy timeout.

    It is also SQLAlchemy's ``OperationalError`` (statement ``BEGIN IMMEDIATE``); its
    ``orig`` is an ``SQLITE_BUSY`` ``sqlite3.OperationalError``, so ``except
    OperationalError`` and ``run_in_transaction`` treat it as SQLite's own
    "database is locked".

    When: an SQLite writer waited while one transaction of this process held the write gate for
    twice the busy timeout. Fix: keep writing scopes short (docs/sqlite.md).
    """


class ReadOnlyError(DbSessionError, _TranslatedDBAPIError):
    """A statement tried to write inside a read-only transaction.

    The driver's exception (PostgreSQL 25006, MySQL/MariaDB 1792, SQLite
    SQLITE_READONLY) is ``orig`` and the ``__cause__``; a write refused by dbsession
    itself (inside a read-only scope joined to a writing one) has no ``orig``.

    When: a write inside ``session_scope(readonly=True)``, and only there. Fix: write in a
    writing scope.
    """


class TransactionAbortedError(ScopeError):
    """The transaction of a unit of work was lost inside one of its savepoints (a deadlock
    or a killed connection rolls back the whole transaction on some backends), so the
    unit of work refuses to commit what is left of it. The cause is ``__cause__``;
    ``run_in_transaction`` retries the whole unit when that cause is transient.

    When: the transaction was lost inside a joined scope (a deadlock, a killed connection), so
    the outer scope refuses to commit. Fix: run the unit with ``run_in_transaction``, which
    retries it whole when the cause is transient.
    """


class NeedsRollbackError(TransactionAbortedError, sa_exc.PendingRollbackError):
    """A statement of the unit of work failed with a database error that the code inside
    the scope caught (or the code called ``session.rollback()``), so the scope refuses to
    commit: everything is rolled back and no on_commit hook runs. The caught error is
    ``__cause__``. Wrap an optional statement in a joined ``session_scope()`` to keep
    the rest of the unit when it fails. Also an ``sqlalchemy.exc.PendingRollbackError``.

    When: a database error was caught inside the scope (or ``session.rollback()`` was called
    there), so the scope refuses to commit. Fix: let the error leave the scope, or run the
    optional statement in a joined ``session_scope()`` and catch the error outside it
    (docs/transactions.md, "A caught database error dooms the unit").
    """


class DatabaseBlockedError(ScopeError):
    """Under the pytest plugin, a test that did not ask for the database (``db_session``,
    ``async_db_session``, the ``dbsession`` mark) used the process default factory."""


class SharedConnectionError(ScopeError):
    """Under the pytest plugin, another thread, or an asyncio task running at the same
    time as one already using it, asked for a session on the test's one connection."""


class PoolExhaustedError(DbSessionError, sa_exc.TimeoutError):
    """No pooled connection became free in time; the message names how many are checked
    out and the call sites of the units of work holding them. Also an
    ``sqlalchemy.exc.TimeoutError``.

    When: no pooled connection became free in time (the message names the call sites holding
    them). Fix: shorter units of work, or a bigger ``pool_size``
    (docs/observability.md).
    """


class NotInitializedError(ConfigurationError):
    """The process default factory was disposed; call ``global_init()`` before using it again.

    When: a module function (``session_scope()`` ..) after
    ``DbSessionFactory.global_dispose()``. Fix: call ``global_init()`` again, or stop the late
    work before disposing.
    """


class BulkInsertError(DbSessionError):
    """``bulk_insert()`` was given a row naming unknown or other columns than the first,
    or the database refused a row; none of the call's rows is kept. The driver's error,
    if any, is the ``__cause__``.

    A refusal by the database is also the SQLAlchemy class of the error it replaces
    (``IntegrityError`` for a constraint, ``DataError`` for a value, ...); see
    ``bulk_insert_refused``.

    When: ``bulk_insert()`` got a row naming other columns, or the database refused a row;
    nothing of the call stays. Fix: fix the row the message names.
    """


def _bulk_refusal_class(base: type[sa_exc.DBAPIError]) -> type[BulkInsertError]:
    name = f"BulkInsert{base.__name__}"
    made = type(name, (BulkInsertError, _TranslatedDBAPIError, base), {"__module__": __name__})
    made.__doc__ = f"A row refused by the database: a BulkInsertError that is a {base.__name__}."
    return made


#: The BulkInsertError class for each SQLAlchemy DBAPIError class (most specific first);
#: each is also a module attribute, so it pickles by name.
_BULK_REFUSALS: dict[type[sa_exc.DBAPIError], type[BulkInsertError]] = {
    base: _bulk_refusal_class(base)
    for base in (
        sa_exc.IntegrityError,
        sa_exc.DataError,
        sa_exc.OperationalError,
        sa_exc.ProgrammingError,
        sa_exc.NotSupportedError,
        sa_exc.InternalError,
        sa_exc.DatabaseError,
        sa_exc.InterfaceError,
        sa_exc.DBAPIError,
    )
}
globals().update({made.__name__: made for made in _BULK_REFUSALS.values()})


def bulk_insert_refused(message: str, error: BaseException) -> BulkInsertError:
    """The BulkInsertError for a row the database refused with ``error`` (a SQLAlchemy
    DBAPIError, or a bare driver error such as psycopg's from COPY): also an instance of
    the SQLAlchemy class that ``error`` is or would be wrapped in (the driver's class
    names are PEP 249's, so the name decides, as in SQLAlchemy's own wrapping)."""
    names = {kind.__name__ for kind in type(error).__mro__}
    orig = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    bases = (base for base in _BULK_REFUSALS if isinstance(error, base) or base.__name__ in names)
    made = _BULK_REFUSALS[next(bases, sa_exc.DBAPIError)]
    return made(message, orig=orig)  # type: ignore[call-arg]


class RetryExhaustedError(DbSessionError):
    """A transient failure persisted through every attempt of ``run_in_transaction``.

    ``attempts`` is how many were made; the last error is ``last_error`` and the
    ``__cause__``.

    When: ``run_in_transaction`` failed transiently until its time budget (15 s by default) ran
    out. Fix: ``retry=RetryPolicy(budget=60.0)`` for a longer failover, or reduce contention.
    """

    def __init__(self, message: str, *, attempts: int, last_error: BaseException) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_error = last_error


class RemovedAPIError(DbSessionError, TypeError):
    """A call of the 0.1 API that 0.2 removed: a class-level ``DbSessionFactory.create_all()``
    and its siblings, ``run_in_transaction(fn, attempts=...)``. The message names the 0.2
    spelling. Also a ``TypeError``, what such a call raised before it was named.

    When: 0.1 code calls a removed spelling. Fix: the spelling the message names
    (``factory.create_all()``, ``retry=RetryPolicy(attempts=...)``).
    """


class MigrationsNotFoundError(ConfigurationError):
    """No Alembic configuration or migrations folder was found where dbsession looked.

    When: no ``alembic.ini`` or ``migrations/`` where dbsession looked. Fix: ``migrations=`` /
    ``--migrations DIR`` / ``DBSESSION_MIGRATIONS``, or ``dbsession init``.
    """


class MigrationError(DbSessionError):
    """An Alembic migration command failed; the message says which and why.

    When: any other Alembic failure: several heads (``dbsession merge -m merge``), no revision
    yet, ``check`` without metadata, an ``.ini`` that cannot be read. Fix: as the message says.
    """


class MigrationLockTimeoutError(MigrationError):
    """The migration lock stayed held by another process for the whole lock timeout.

    When: another process held the migration lock for the whole lock timeout. Fix: let the
    other upgrade finish; the message names the holder.
    """


class MigrationBlockedError(MigrationError, _TranslatedDBAPIError, sa_exc.OperationalError):
    """A migration statement could not get its table lock within the lock wait, in every
    attempt; everything it did was rolled back (PostgreSQL) or never started (MariaDB).

    ``blockers`` describes the sessions that held the lock (server process id, state,
    how long their transaction had been open, their query); ``attempts`` is how many
    tries were made. Also a SQLAlchemy ``OperationalError``: the driver's lock-timeout
    error is ``orig``.

    When: a migration statement did not get its table lock within the lock wait, in every
    attempt (docs/migrations.md). Fix: end or wait out the transaction the message names, or a
    longer ``lock_wait=``.
    """

    blockers: tuple[Blocker, ...] = ()
    attempts: int = 0


class UnknownRevisionError(MigrationError):
    """The revision named does not exist in the migrations folder.

    When: ``upgrade nope``. Fix: ``dbsession history`` lists the revisions.
    """


class SchemaNotAtHeadError(MigrationError):
    """The database schema is not at the newest migration revision.

    When: ``require_head()`` / ``global_init(require_migrated=True)`` on a database behind the
    migrations. Fix: ``dbsession upgrade``.
    """

    def __init__(self, current: str | None, head: str) -> None:
        self.current = current
        self.head = head
        super().__init__(
            f"The database schema is at revision {current or '<base> (empty)'} but the "
            f"migrations head is {head}. Run 'dbsession upgrade' (or "
            "dbsession.migrations.upgrade()) before starting the app."
        )
