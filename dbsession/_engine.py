"""Building one engine per backend with dbsession's opinions applied.

- every backend: ``pool_pre_ping=True``; a fork guard so a child process never
  reuses its parent's pooled connections; connect failures raised as
  DatabaseUnreachableError naming host and port.
- PostgreSQL and MySQL/MariaDB: a bare URL scheme gets the driver we ship
  (psycopg 3, PyMySQL); see ``_config``.
- SQLite: ``PRAGMA foreign_keys=ON``, WAL for files, a busy timeout, and
  SQLAlchemy (not pysqlite) emits ``BEGIN``, so SAVEPOINT works and write
  sessions can ask for ``BEGIN IMMEDIATE``. In-memory databases use the
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
import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, exc
from sqlalchemy.engine import URL, Connection, Engine, ExceptionContext
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.util import await_only

from ._classify import is_read_only_violation
from ._config import Settings, is_secret_parameter, mask_url, scrub, secrets_of
from ._errors import (
    ConfigurationError,
    DatabaseReadOnlyError,
    DatabaseUnreachableError,
    DbSessionError,
    InvalidURLError,
    MissingDriverError,
    ReadOnlyError,
    SQLitePathError,
    UnknownDialectError,
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
    keeper: sqlite3.Connection | None = None
    is_sqlite = url.get_backend_name() == "sqlite"
    connector = None
    if is_sqlite:
        url, keeper = _prepare_sqlite_url(url)
    if "creator" not in options:
        connector = _Connector(settings, options.pop("connect_args", None) or {})
        options["creator"] = connector
    built = _create(create, url, settings, options)
    engine = sync_engine_of(built)
    if connector is not None:
        connector.engine = engine
    _install_fork_guard(engine)
    _install_read_only_errors(engine)
    if is_sqlite:
        _install_sqlite_opinions(engine, settings.sqlite_busy_timeout, wal=keeper is None)
        if keeper is not None:
            weakref.finalize(engine, keeper.close)
    if engine.dialect.name in ("mysql", "mariadb"):
        _install_mysql_read_only(engine)
    logger.info("dbsession: engine created for %s", settings.describe())
    return built


def _create(create: Callable[..., E], url: URL, settings: Settings, options: dict[str, Any]) -> E:
    try:
        with warnings.catch_warnings():
            # SQLAlchemy only warns of URL query options the driver ignores: a mistake.
            warnings.simplefilter("error", exc.SAWarning)
            return create(url, **options)
    except exc.SAWarning as warning:
        raise ConfigurationError(
            f"The URL {settings.describe()} has an option the driver does not use: "
            f"{_first_line(warning, url)} Remove it or fix its name."
        ) from None
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
    except exc.ArgumentError as error:  # e.g. a SQLite URL with a user, password or host
        raise InvalidURLError(
            f"The URL {settings.describe()} cannot be used: {_first_line(error, url)}. "
            "SQLite URLs are sqlite:///relative/file.db or sqlite:////absolute/file.db."
            if url.get_backend_name() == "sqlite"
            else f"The URL {settings.describe()} cannot be used: {_first_line(error, url)}."
        ) from None
    except (TypeError, ValueError) as error:
        raise ConfigurationError(
            f"Invalid engine option{_suspects(str(error), url)} for {settings.describe()}: "
            f"{_first_line(error, url)}. Check the URL's query string and the keyword "
            "arguments given to global_init() or DbSessionFactory()."
        ) from None


def _suspects(message: str, url: URL) -> str:
    """`` 'name'`` for the URL query options whose name or value the driver's message
    quotes (secret values are never looked at), else the empty string."""
    named = [
        key
        for key, value in url.query.items()
        if key in message
        or (not is_secret_parameter(key) and isinstance(value, str) and repr(value) in message)
    ]
    return f" {', '.join(repr(key) for key in named)}" if named else ""


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


def scope_options(engine: Engine, *, readonly: bool, isolation_level: str | None) -> dict[str, Any]:
    """The execution options of the engine a scope of this kind runs on.

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
        name = context.dialect.name
        if not is_read_only_violation(original, name):
            return None
        driver_says = f"{name}: {_first_line(original, engine.url)}"
        if _in_read_only_scope(context.connection):
            return ReadOnlyError(
                f"A write was refused because the transaction is read-only ({driver_says}). "
                "session_scope(readonly=True) never writes: do this work in a writing "
                "scope, session_scope()."
            )
        if name == "sqlite":
            return SQLitePathError(
                f"The SQLite database {engine.url.database!r} can only be read by this "
                f"process ({driver_says}): the file or its folder is not writable, or the "
                "URL opens it read-only (mode=ro, immutable=1). Fix the permissions or the URL."
            )
        return DatabaseReadOnlyError(
            f"The {name} server refused a write in a writing scope because the database "
            f"session is read-only ({driver_says}): the URL {mask_url(engine.url)} points at "
            "a read-only server (a hot standby or replica, MySQL read_only) or a role or "
            "database with default_transaction_read_only. Point it at the primary."
        )


def _in_read_only_scope(connection: Connection | None) -> bool:
    if connection is None:
        return False
    options = connection.get_execution_options()
    return bool(options.get(READONLY_OPTION) or options.get("postgresql_readonly"))


def _install_mysql_read_only(engine: Engine) -> None:
    @event.listens_for(engine, "begin")
    def begin(connection: Connection) -> None:
        if connection.get_execution_options().get(READONLY_OPTION):
            connection.exec_driver_sql("START TRANSACTION READ ONLY")


class _Secret(str):
    """A password whose repr is masked: what pytest, debuggers and error trackers show of
    the driver's keyword arguments in a traceback's frames. It is still the password."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


class _Connector:
    """The pool's creator: every connection is opened through dbsession's own frame, so the
    driver's connect failures are raised from here as named errors, without the driver's
    frames, locals or chained exceptions (which hold the password), and the password in
    the connect arguments has a masked repr in every frame that remains (SQLAlchemy's own
    creator keeps them, unmasked, in its closure)."""

    def __init__(self, settings: Settings, connect_args: Mapping[str, Any]) -> None:
        self.settings = settings
        self.connect_args = dict(connect_args)
        self.engine: Engine | None = None  # set once built; the pool connects only later

    def __call__(self, connection_record: Any = None) -> Any:
        assert self.engine is not None
        dialect = self.engine.dialect
        cargs, cparams = _masked_connect_args(self.engine.url, dialect, self.connect_args)
        try:
            return dialect.connect(*cargs, **cparams)
        except Exception as error:
            failure = _connect_failure(error, dialect, self.settings, self.engine.url)
        raise failure from None  # outside the except block: no driver frames, no context


def _masked_connect_args(
    url: URL, dialect: Any, connect_args: Mapping[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """The dialect's connect arguments for ``url`` plus ``connect_args`` (which win, as in
    SQLAlchemy), the password and secret options wrapped so their repr is masked."""
    cargs, cparams = dialect.create_connect_args(url)
    secrets = set(secrets_of(url))
    return list(cargs), {
        key: _Secret(value)
        if isinstance(value, str) and (value in secrets or is_secret_parameter(key))
        else value
        for key, value in {**cparams, **connect_args}.items()
    }


def _connect_failure(
    error: Exception, dialect: Any, settings: Settings, url: URL
) -> DbSessionError:
    """The named error for a driver's refusal to open a connection."""
    backend = url.get_backend_name()
    where = f"{url.host or 'localhost'}:{url.port or _default_port(url)}"
    dbapi = dialect.loaded_dbapi
    if backend == "sqlite" and isinstance(error, dbapi.Error):
        return SQLitePathError(
            f"Cannot open the SQLite database {url.database!r}: {_first_line(error, url)}. "
            "Check the path, its permissions and the URL's options (mode=, vfs=)."
        )
    if isinstance(error, UnicodeError):
        return ConfigurationError(
            f"The {backend} driver cannot send the user name or password of "
            f"{settings.describe()}: it has characters the driver's protocol cannot encode "
            "(PyMySQL and aiomysql send them as latin-1). Use a password of ASCII or "
            "latin-1 characters."
        )
    if isinstance(error, dbapi.OperationalError):
        return DatabaseUnreachableError(
            f"Cannot connect to the {backend} server at {where} "
            f"(database {url.database!r}, user {url.username!r}): "
            f"{_first_line(error, url)}. Check that the server is running and that the "
            f"URL {settings.describe()} is right."
        )
    given = sorted({*url.query, *settings.engine_options.get("connect_args", {})})
    return ConfigurationError(
        f"The {backend} driver refused the connection options of {settings.describe()}"
        f"{_suspects(str(error), url) or ''} ({type(error).__name__}: {_first_line(error, url)})."
        f" Fix the URL's query string or connect_args (options given: "
        f"{', '.join(given) or 'none'})."
    )


def _first_line(error: BaseException, url: URL) -> str:
    """The driver's message, first line only, with the URL's secrets removed."""
    return scrub((str(error).strip().splitlines() or [""])[0], url)


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
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise SQLitePathError(
            f"The SQLite database file {str(path)!r} is not readable and writable "
            "by this process: fix its permissions or point the URL elsewhere."
        )
    try:  # also for an existing file: WAL creates -wal and -shm files beside it
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        raise SQLitePathError(
            f"The folder {str(folder)!r} of the SQLite database is not writable by this "
            "process (SQLite needs it for the database and its journal files): "
            "fix its permissions or point the URL at a writable folder."
        ) from None


def _install_sqlite_opinions(engine: Engine, busy_timeout: float, *, wal: bool) -> None:
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
        connection.exec_driver_sql(options.get(SQLITE_BEGIN_OPTION, "BEGIN"))
        if options.get(READONLY_OPTION):
            connection.exec_driver_sql("PRAGMA query_only=ON")
            connection.info[_QUERY_ONLY_FLAG] = True

    @event.listens_for(engine, "checkin")
    def writable_again(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        # A pooled connection never stays query_only after its read-only scope.
        if record.info.pop(_QUERY_ONLY_FLAG, False) and dbapi_connection is not None:
            dbapi_connection.execute("PRAGMA query_only=OFF")
