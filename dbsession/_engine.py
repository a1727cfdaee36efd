"""Building one engine per backend with dbsession's opinions applied.

- every backend: ``pool_pre_ping=True``; a fork guard so a child process never
  reuses its parent's pooled connections; connect failures raised as
  DatabaseUnreachableError naming host and port.
- PostgreSQL and MySQL/MariaDB: a bare URL scheme gets the driver we ship
  (psycopg 3, PyMySQL); see ``_config``.
- SQLite: ``PRAGMA foreign_keys=ON``, WAL for files, a busy timeout, and
  dbsession (not pysqlite) emits ``BEGIN`` on the raw connection, so SAVEPOINT
  works and write sessions can ask for ``BEGIN IMMEDIATE``, which first takes the
  database's in-process write gate (``_sqlite_gate``; docs/sqlite.md). In-memory databases use the
  ``memdb`` VFS so several threads (several connections) see one database.
  A statement interrupted by task cancellation is stopped and its transaction
  ended at once (aiosqlite runs it in a thread of its own).
- read-only transactions (:func:`scope_options`): PostgreSQL through SQLAlchemy's
  ``postgresql_readonly``; MySQL/MariaDB ``START TRANSACTION READ ONLY`` and SQLite
  ``PRAGMA query_only`` from begin hooks here; the backend's refusal of a write
  raised as ReadOnlyError.

``build_engine`` applies all of this to ``create_engine`` and, for
``dbsession.asyncio``, to ``create_async_engine(...).sync_engine``.
"""

from __future__ import annotations

import inspect
import logging
import os
import sqlite3
import tempfile
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, exc
from sqlalchemy.engine import URL, Connection, Engine, ExceptionContext
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.util import await_only

from . import observability
from ._classify import is_read_only_violation
from ._config import Settings, first_line, mask_url, scrub
from ._errors import (
    ConfigurationError,
    DatabaseUnreachableError,
    MissingDriverError,
    ReadOnlyError,
    SQLitePathError,
    UnknownDialectError,
)
from ._pool import pool_class_for
from ._pooler import install_connection_loss, prepared_statement_args
from ._sqlite_gate import execute_raw, install_write_gate
from ._timeouts import (
    TIMEOUT_OPTION,
    check_timeout,
    driver_timeouts,
    install_ping_timeout,
    install_scope_timeouts,
)

logger = logging.getLogger("dbsession")

#: Execution option read by the SQLite ``begin`` hook: ``"BEGIN"`` or ``"BEGIN IMMEDIATE"``.
SQLITE_BEGIN_OPTION = "dbsession_sqlite_begin"
#: Execution option read by the MySQL and SQLite ``begin`` hooks: the transaction is read-only.
READONLY_OPTION = "dbsession_readonly"
_QUERY_ONLY_FLAG = "dbsession_query_only"

_INSTALL_HINTS = {
    "psycopg": "pip install 'dbsession[postgres]'",
    "pymysql": "pip install 'dbsession[mysql]'",
    "psycopg2": "pip install psycopg2-binary, or use a postgresql+psycopg:// URL "
    "with pip install 'dbsession[postgres]'",
    "mysqldb": "pip install mysqlclient, or use a mysql+pymysql:// URL "
    "with pip install 'dbsession[mysql]'",
    "aiosqlite": "pip install 'dbsession[async]'",
    "asyncpg": "pip install asyncpg, or use a postgresql+psycopg:// URL "
    "with pip install 'dbsession[postgres]'",
    "aiomysql": "pip install 'dbsession[async]'",
}
_SUPPORTED = (
    "sqlite, postgresql+psycopg, mysql+pymysql or mariadb+pymysql "
    "(async: sqlite+aiosqlite, postgresql+psycopg, mysql+aiomysql)"
)

E = TypeVar("E")


def make_engine(settings: Settings) -> Engine:
    """Create the engine for ``settings``; raise a ConfigurationError if it cannot be built."""
    return build_engine(settings, create_engine, lambda engine: engine)


def build_engine(
    settings: Settings, create: Callable[..., E], sync_engine_of: Callable[[E], Engine]
) -> E:
    """Create an engine with ``create`` (``create_engine`` or ``create_async_engine``) and
    install dbsession's opinions on ``sync_engine_of(engine)``, where the events live.

    Raises UnknownDialectError, MissingDriverError, SQLitePathError or ConfigurationError
    when the URL or options cannot work.
    """
    url = settings.url
    options: dict[str, Any] = {"pool_pre_ping": True, **settings.engine_options}
    connect_args = {
        **driver_timeouts(url, settings.timeouts),
        **prepared_statement_args(url, settings.pooler),
        **options.get("connect_args", {}),
    }
    if connect_args:
        options["connect_args"] = connect_args
    keeper: sqlite3.Connection | None = None
    is_sqlite = url.get_backend_name() == "sqlite"
    if is_sqlite:
        url, keeper = _prepare_sqlite_url(url)
    if "poolclass" not in options and "pool" not in options:
        tracked = pool_class_for(url, asyncio=create is not create_engine)
        if tracked is not None:
            options["poolclass"] = tracked
    built = _create(create, url, settings, options)
    engine = sync_engine_of(built)
    _install_fork_guard(engine)
    observability.watch(engine)
    _install_read_only_errors(engine)
    if is_sqlite:
        _install_sqlite_opinions(
            engine, url.database or "", settings.sqlite_busy_timeout, wal=keeper is None
        )
        if keeper is not None:
            weakref.finalize(engine, keeper.close)
    else:
        _install_connect_errors(engine, url, settings.source)
        install_connection_loss(engine, f"the {url.get_backend_name()} server {_where(url)}")
        install_ping_timeout(engine, settings.timeouts)
    install_scope_timeouts(engine)
    if engine.dialect.name in ("mysql", "mariadb"):
        _install_mysql_read_only(engine)
    logger.info("dbsession: engine created for %s", settings.describe())
    return built


def _create(create: Callable[..., E], url: URL, settings: Settings, options: dict[str, Any]) -> E:
    try:
        return create(url, **options)
    except exc.InvalidRequestError as error:  # a sync driver under create_async_engine
        raise ConfigurationError(
            f"{settings.describe()} cannot be used here: {scrub(str(error), url)} "
            f"Name a fitting driver, or none to get the default: {_SUPPORTED}."
        ) from None
    except exc.NoSuchModuleError:
        raise UnknownDialectError(
            f"Unknown database dialect or driver {url.drivername!r} in {settings.describe()}. "
            f"Use one of: {_SUPPORTED}."
        ) from None
    except ImportError as error:
        driver = url.get_driver_name()
        hint = _INSTALL_HINTS.get(driver, f"pip install the DBAPI driver for {url.drivername}")
        raise MissingDriverError(
            f"The driver {driver!r} for {url.get_backend_name()} is not installed "
            f"(module {error.name or driver!r} not found). Install it: {hint}."
        ) from None
    except TypeError as error:
        raise ConfigurationError(
            f"Invalid engine option for {settings.describe()}: "
            f"{scrub(str(error), url)}. Check the keyword arguments given to "
            "global_init() or DbSessionFactory()."
        ) from None


_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def _forget_inherited_pools() -> None:
    """In a forked child, start every engine on an empty pool (the parent's stay untouched).

    The checkout guard below is not enough alone: SQLAlchemy pre-pings a pooled
    connection *before* the checkout event, so the child would send its ping on
    the parent's socket and could steal or corrupt the parent's replies.
    """
    for engine in list(_ENGINES):
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_pools)


def _install_fork_guard(engine: Engine) -> None:
    """SQLAlchemy's recipe: a pooled connection is only ever used by the process that opened it."""
    _ENGINES.add(engine)

    @event.listens_for(engine, "connect")
    def remember_pid(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["dbsession_pid"] = os.getpid()

    @event.listens_for(engine, "checkout")
    def refuse_foreign(
        dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        if record.info.get("dbsession_pid") != os.getpid():
            # Drop without closing: closing would end the parent's server session.
            record.dbapi_connection = proxy.dbapi_connection = None  # type: ignore[misc]
            raise exc.DisconnectionError(
                "connection was opened by another process; reconnecting in this one"
            )


def scope_options(
    engine: Engine, *, readonly: bool, isolation_level: str | None, timeout: float | None = None
) -> dict[str, Any]:
    """The execution options of the engine a scope of this kind runs on.

    ``timeout``: the scope's time budget in seconds, applied by ``_timeouts``.

    SQLite writing scopes take the write lock at ``BEGIN IMMEDIATE``; read-only ones
    use a plain ``BEGIN`` (WAL readers never wait) plus ``PRAGMA query_only``.
    """
    options: dict[str, Any] = {}
    name = engine.dialect.name
    if name == "sqlite":
        options[SQLITE_BEGIN_OPTION] = "BEGIN" if readonly else "BEGIN IMMEDIATE"
    if readonly:
        options["postgresql_readonly" if name == "postgresql" else READONLY_OPTION] = True
    if isolation_level is not None:
        options["isolation_level"] = isolation_level
    if timeout is not None:
        options[TIMEOUT_OPTION] = check_timeout(timeout)
    return options


def isolation_levels(engine: Engine) -> tuple[str, ...]:
    """The isolation level names the engine's dialect accepts.

    The dialects dbsession ships drivers for answer without a connection (so an
    AsyncEngine's sync_engine can be asked outside the event loop); another dialect
    gets one connection opened.
    """
    try:
        return tuple(engine.dialect.get_isolation_level_values(None))  # type: ignore[arg-type]
    except Exception:
        pass
    raw = engine.raw_connection()
    try:
        assert raw.dbapi_connection is not None
        return tuple(engine.dialect.get_isolation_level_values(raw.dbapi_connection))
    finally:
        raw.close()


def _install_read_only_errors(engine: Engine) -> None:
    @event.listens_for(engine, "handle_error")
    def read_only(context: ExceptionContext) -> BaseException | None:
        original = context.original_exception
        if not is_read_only_violation(original, context.dialect.name):
            return None
        return ReadOnlyError(
            f"A write was refused because the transaction is read-only "
            f"({context.dialect.name}: {first_line(original, engine.url)}). "
            "session_scope(readonly=True) never writes: do this work in a writing "
            "scope, session_scope()."
        )


def _install_mysql_read_only(engine: Engine) -> None:
    @event.listens_for(engine, "begin")
    def begin(connection: Connection) -> None:
        if connection.get_execution_options().get(READONLY_OPTION):
            connection.exec_driver_sql("START TRANSACTION READ ONLY")


def _install_connect_errors(engine: Engine, url: URL, source: str) -> None:
    @event.listens_for(engine, "handle_error")
    def unreachable(context: ExceptionContext) -> BaseException | None:
        if context.connection is not None or context.is_pre_ping:
            return None
        if not isinstance(context.sqlalchemy_exception, exc.OperationalError):
            return None
        setting = "replica_url=" if source == "replica_url" else "DATABASE_URL or global_init"
        server = "replica" if source == "replica_url" else "server"
        return DatabaseUnreachableError(
            f"Cannot connect to the {url.get_backend_name()} {server} at {_where(url)} "
            f"(database {url.database!r}, user {url.username!r}): "
            f"{first_line(context.original_exception, url)}. Check that the {server} is "
            f"running and that the URL {mask_url(url)} ({setting}) is right."
        )


def _where(url: URL) -> str:
    return f"{url.host or 'localhost'}:{url.port or _default_port(url)}"


def _default_port(url: URL) -> int:
    return 5432 if url.get_backend_name() == "postgresql" else 3306


def _prepare_sqlite_url(url: URL) -> tuple[URL, sqlite3.Connection | None]:
    """Validate a file path, or turn an in-memory URL into a shared ``memdb`` one."""
    database = url.database or ""
    if database in ("", ":memory:"):
        name = f"file:/dbsession-{uuid.uuid4().hex}?vfs=memdb"
        keeper = sqlite3.connect(name, uri=True, check_same_thread=False)
        return url.set(database=name).update_query_dict({"uri": "true"}), keeper
    if database.startswith("file:"):
        return url, None
    _check_sqlite_path(Path(database).expanduser())
    return url, None


def _check_sqlite_path(path: Path) -> None:
    folder = path.absolute().parent
    if not folder.is_dir():
        raise SQLitePathError(
            f"The folder of the SQLite database {str(path)!r} does not exist: "
            f"create it (mkdir -p {str(folder)!r}) or point the URL at another file."
        )
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise SQLitePathError(
                f"The SQLite database file {str(path)!r} is not readable and writable "
                "by this process: fix its permissions or point the URL elsewhere."
            )
        return
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        raise SQLitePathError(
            f"The folder {str(folder)!r} of the SQLite database is not writable by this "
            "process (SQLite needs it for the database and its journal files): "
            "fix its permissions or point the URL at a writable folder."
        ) from None


def _install_sqlite_opinions(
    engine: Engine, database: str, busy_timeout: float, *, wal: bool
) -> None:
    begin_writer = install_write_gate(engine, database, busy_timeout)

    @event.listens_for(engine, "connect")
    def configure(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        # Take BEGIN away from pysqlite so SQLAlchemy's own begin hook below emits it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            if wal:
                cursor.execute("PRAGMA journal_mode=WAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "handle_error")
    def interrupt_on_cancel(context: ExceptionContext) -> None:
        # A cancelled task (or KeyboardInterrupt) left a statement running in the
        # driver's thread (aiosqlite): stop it and end its transaction now, so the
        # write lock is released at once, not when the statement would have finished
        # (nor, closed with a cursor still referenced, never).
        if context.connection is None or isinstance(context.original_exception, Exception):
            return
        driver: Any = context.connection.connection.driver_connection
        try:
            for step in (driver.interrupt, driver.rollback):
                outcome = step()
                if inspect.isawaitable(outcome):
                    await_only(outcome)
        except Exception:
            logger.debug("dbsession: interrupting the cancelled statement failed", exc_info=True)

    @event.listens_for(engine, "begin")
    def begin(connection: Connection) -> None:
        options = connection.get_execution_options()
        statement = options.get(SQLITE_BEGIN_OPTION, "BEGIN")
        if statement == "BEGIN IMMEDIATE":
            begin_writer(connection)  # the process's writers queue on the gate, not in SQLite
        else:
            execute_raw(connection, statement)
        if options.get(READONLY_OPTION):
            connection.exec_driver_sql("PRAGMA query_only=ON")
            connection.info[_QUERY_ONLY_FLAG] = True

    @event.listens_for(engine, "checkin")
    def writable_again(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        # A pooled connection never stays query_only after its read-only scope.
        if record.info.pop(_QUERY_ONLY_FLAG, False) and dbapi_connection is not None:
            dbapi_connection.execute("PRAGMA query_only=OFF")
