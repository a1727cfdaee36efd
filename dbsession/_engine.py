"""Building one engine per backend with dbsession's opinions applied.

- every backend: a fork guard so a child process never reuses its parent's pooled
  connections; connect failures raised as DatabaseUnreachableError naming host and port;
  a pool of ``DEFAULT_POOL_SIZE`` kept connections (``DEFAULT_MAX_OVERFLOW`` more at a peak).
- PostgreSQL and MySQL/MariaDB: a pooled connection is checked before use without a
  round trip (:func:`_install_liveness_check`): pinged only when its socket has something
  to say (the server closed it, or sent an error) or it sat idle over ``Timeouts.ping_after_idle``
  seconds. SQLite has nothing to ping (no network).
- PostgreSQL and MySQL/MariaDB: a bare URL scheme gets the driver we ship
  (psycopg 3, PyMySQL); see ``_config``.
- SQLite: ``PRAGMA foreign_keys=ON``, WAL for files, a busy timeout, and
  dbsession (not pysqlite) emits ``BEGIN`` on the raw connection, so SAVEPOINT
  works and write sessions can ask for ``BEGIN IMMEDIATE``, which first takes the
  database's in-process write gate (``_sqlite_gate``; docs/sqlite.md). In-memory databases use the
  ``memdb`` VFS so several threads (several connections) see one database.
  A statement interrupted by task cancellation is stopped and its transaction
  ended at once (aiosqlite runs it in a thread of its own).
- read-only transactions (:func:`scope_engine`): PostgreSQL through SQLAlchemy's
  ``postgresql_readonly``; MySQL/MariaDB ``START TRANSACTION READ ONLY`` from a begin
  hook on the read-only view only; SQLite on a read-only twin engine
  (:func:`read_only_engine`), its own pool of connections set ``PRAGMA query_only``
  once at connect. The backend's refusal of a write is raised as ReadOnlyError.

``build_engine`` applies all of this to ``create_engine`` and, for
``dbsession.asyncio``, to ``create_async_engine(...).sync_engine``.
"""

from __future__ import annotations

import inspect
import logging
import os
import select
import sqlite3
import tempfile
import threading
import time
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

from . import observability
from ._classify import is_read_only_violation
from ._config import Settings, first_line, is_secret_parameter, mask_url, scrub, secrets_of
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
from ._pool import pool_class_for
from ._pooler import install_connection_loss, prepared_statement_args
from ._sqlite_gate import install_deferred_begin, install_write_gate, writer_view
from ._timeouts import (
    TIMEOUT_OPTION,
    check_timeout,
    driver_timeouts,
    install_ping_timeout,
    install_scope_timeouts,
    install_timeout_errors,
)

logger: logging.Logger = logging.getLogger("dbsession")

#: Execution option of the engines of read-only scopes (MySQL/MariaDB views, SQLite's
#: read-only twin): the errors they raise are read as a read-only scope's.
READONLY_OPTION = "dbsession_readonly"

_INSTALL_HINTS = {
    "psycopg": "pip install 'sqlalchemy-dbsession[postgres]'",
    "pymysql": "pip install 'sqlalchemy-dbsession[mysql]'",
    "psycopg2": "pip install psycopg2-binary, or use a postgresql+psycopg:// URL "
    "with pip install 'sqlalchemy-dbsession[postgres]'",
    "mysqldb": "pip install mysqlclient, or use a mysql+pymysql:// URL "
    "with pip install 'sqlalchemy-dbsession[mysql]'",
    "aiosqlite": "pip install 'sqlalchemy-dbsession[async]'",
    "asyncpg": "pip install asyncpg, or use a postgresql+psycopg:// URL "
    "with pip install 'sqlalchemy-dbsession[postgres]'",
    "aiomysql": "pip install 'sqlalchemy-dbsession[async]'",
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
    keeper: sqlite3.Connection | None = None
    is_sqlite = url.get_backend_name() == "sqlite"
    if is_sqlite:
        url, keeper = _prepare_sqlite_url(url)
    asyncio = create is not create_engine
    built = _build(settings, url, create, sync_engine_of, wal=keeper is None, asyncio=asyncio)
    engine = sync_engine_of(built)
    if keeper is not None:
        weakref.finalize(engine, keeper.close)
    if is_sqlite:
        wal = keeper is None
        _READ_ONLY_TWINS[engine] = _TwinMaker(
            lambda: _build(
                settings, url, create, sync_engine_of, wal=wal, asyncio=asyncio, query_only=True
            )
        )
    logger.info("dbsession: engine created for %s", settings.describe())
    return built


def _build(
    settings: Settings,
    url: URL,
    create: Callable[..., E],
    sync_engine_of: Callable[[E], Engine],
    *,
    wal: bool,
    asyncio: bool,
    query_only: bool = False,
) -> E:
    """One engine on ``url`` (already prepared) with every opinion installed."""
    is_sqlite = url.get_backend_name() == "sqlite"
    options = {
        **_default_options(url, settings.engine_options, asyncio=asyncio),
        **settings.engine_options,
    }
    defaults = {
        **driver_timeouts(url, settings.timeouts),
        **prepared_statement_args(url, settings.pooler),
    }
    connector = None
    if "creator" not in options:
        connector = _Connector(settings, options.pop("connect_args", None) or {}, defaults)
        options["creator"] = connector
    built = _create(create, url, settings, options)
    engine = sync_engine_of(built)
    if connector is not None:
        connector.engine = engine
    _install_fork_guard(engine)
    observability.watch(engine)
    _install_read_only_errors(engine)
    install_timeout_errors(engine)
    if is_sqlite:
        _install_sqlite_opinions(engine, settings.sqlite_busy_timeout, wal=wal)
        if query_only:
            _install_query_only(engine)
        else:
            install_write_gate(engine, url.database or "", settings.sqlite_busy_timeout)
    else:
        install_connection_loss(engine, f"the {url.get_backend_name()} server {_where(url)}")
        if "pool_pre_ping" not in options:
            _install_liveness_check(engine, settings.timeouts.ping_after_idle)
        install_ping_timeout(engine, settings.timeouts)
    return built


#: Connections a pool keeps open, and how many more it opens at a peak (closed on return).
#: SQLAlchemy's defaults are 5 and 10: an overflow connection is closed when it comes
#: back to a pool already holding 5 idle ones, and reopened at the next peak (measured:
#: 19 connections opened over 5 bursts of 8 threads, against 7). 10 kept and 5 more
#: keeps SQLAlchemy's ceiling of 15 per process while up to 10 busy threads never
#: reconnect; a pool only grows to the peak it saw. See benchmarks/RESULTS.md, "Pool".
DEFAULT_POOL_SIZE = 10
DEFAULT_MAX_OVERFLOW = 5


def _default_options(url: URL, given: Mapping[str, Any], *, asyncio: bool) -> dict[str, Any]:
    """dbsession's engine options, before the user's: when the pool would be a QueuePool
    (not for a ``poolclass`` or ``pool`` of the user's, nor a SQLite ``mode=memory``
    URL's SingletonThreadPool), its size and the subclass that knows who holds its
    connections (``_pool``)."""
    if "poolclass" in given or "pool" in given:
        return {}
    tracked = pool_class_for(url, asyncio=asyncio)
    if tracked is None:
        return {}
    return {
        "poolclass": tracked,
        "pool_size": DEFAULT_POOL_SIZE,
        "max_overflow": DEFAULT_MAX_OVERFLOW,
    }


#: The URL query options pysqlite and aiosqlite take (without ``uri=true``, which passes
#: any other option on to SQLite itself).
_SQLITE_QUERY_OPTIONS = frozenset(
    {"timeout", "isolation_level", "detect_types", "check_same_thread", "cached_statements", "uri"}
)


def _create(create: Callable[..., E], url: URL, settings: Settings, options: dict[str, Any]) -> E:
    if url.get_backend_name() == "sqlite" and "uri" not in url.query:
        # SQLAlchemy 2.1 warns of these (caught below); 2.0 drops them without a word.
        unknown = sorted(set(url.query) - _SQLITE_QUERY_OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"The URL {settings.describe()} has an option the driver does not use: "
                f"{', '.join(unknown)}. Remove it or fix its name."
            )
    try:
        with warnings.catch_warnings():
            # SQLAlchemy only warns of URL query options the driver ignores: a mistake.
            warnings.simplefilter("error", exc.SAWarning)
            return create(url, **options)
    except exc.SAWarning as warning:
        raise ConfigurationError(
            f"The URL {settings.describe()} has an option the driver does not use: "
            f"{first_line(warning, url)} Remove it or fix its name."
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
            f"The URL {settings.describe()} cannot be used: {first_line(error, url)}. "
            "SQLite URLs are sqlite:///relative/file.db or sqlite:////absolute/file.db."
            if url.get_backend_name() == "sqlite"
            else f"The URL {settings.describe()} cannot be used: {first_line(error, url)}."
        ) from None
    except (TypeError, ValueError) as error:
        raise ConfigurationError(
            f"Invalid engine option{_suspects(str(error), url)} for {settings.describe()}: "
            f"{first_line(error, url)}. Check the URL's query string and the keyword "
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


_IDLE_SINCE = "dbsession_idle_since"


def _install_liveness_check(engine: Engine, ping_after_idle: float) -> None:
    """Replace a dead pooled connection before use, without a round trip per checkout.

    SQLAlchemy's ``pool_pre_ping`` sends ``SELECT 1`` on every checkout: one full round
    trip per unit of work. A server that ends a session (a kill, a restart, an idle
    timeout) closes its socket, which the checkout sees for the cost of one ``poll()``.
    So a connection is pinged (``dialect.do_ping``) only when its socket is readable
    while idle (closed, or an error message waiting), or it has been idle for more than
    ``ping_after_idle`` seconds (``Timeouts``; a peer lost without a word, say behind a NAT that
    forgot it); a failed ping raises DisconnectionError, on which the pool opens a new
    connection in its place. After any disconnect seen during a statement, SQLAlchemy
    itself invalidates every connection of the pool opened before it. A driver whose
    socket cannot be found is pinged on every checkout, like ``pool_pre_ping``.
    ``pool_pre_ping=True`` (ping always) or ``False`` (check nothing) in the engine
    options replaces this check.
    """
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def idle_from(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def check(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is None:  # just opened
            return
        if time.monotonic() - since < ping_after_idle and _quiet(dbapi_connection):
            return
        try:
            alive = dialect.do_ping(dbapi_connection)
        except Exception:
            alive = False
        if not alive:
            raise exc.DisconnectionError("the pooled connection was closed by the server")


def _quiet(dbapi_connection: Any) -> bool:
    """True if the idle connection's socket has nothing to read: the server has not
    closed it nor sent anything. False when that cannot be known."""
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    try:
        pgconn = getattr(driver, "pgconn", None)  # psycopg, sync and async
        if pgconn is not None:
            fd = pgconn.socket
        else:
            sock = driver._sock  # PyMySQL
            fd = sock.fileno() if sock is not None else -1
    except Exception:
        return False
    if not isinstance(fd, int) or fd < 0:
        return False
    if _poll is not None:
        poller = _poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        return not poller.poll(0)
    return not select.select([fd], [], [fd], 0)[0]  # pragma: no cover (no poll(): Windows)


_poll = getattr(select, "poll", None)


class _TwinMaker:
    """Builds, once and on first use, a SQLite engine's read-only twin (see read_only_engine)."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build: Callable[[], Any] | None = build
        self._lock = threading.Lock()
        self.twin: Any = None

    def get(self, engine: Engine) -> Any:
        with self._lock:
            if self.twin is None and self._build is not None:
                self.twin = self._build()
                self._build = None  # built once; a disposed engine's twin is only emptied
                sync_twin: Engine = getattr(self.twin, "sync_engine", self.twin)
                # Engine.dispose() dispatches engine_disposed whatever _has_events says; the
                # flag, which listening sets, only sends every statement of the engine
                # through SQLAlchemy's event dispatch, which this listener does not need.
                had_events = engine._has_events
                event.listen(engine, "engine_disposed", lambda _: sync_twin.dispose())
                engine._has_events = had_events
            return self.twin


_READ_ONLY_TWINS: weakref.WeakKeyDictionary[Engine, _TwinMaker] = weakref.WeakKeyDictionary()


def read_only_engine(sync_engine: Engine) -> Any:
    """The engine read-only scopes of this SQLite engine run on, or None (another backend).

    It is a second engine (``AsyncEngine`` for an async one) on the same database with
    the same opinions and a pool of its own, whose connections are set ``PRAGMA
    query_only=ON`` once, when opened. A read-only scope there costs a plain deferred
    ``BEGIN`` and nothing else (WAL readers never wait), where switching a shared
    connection to query_only and back cost two more statements per scope. Built on first
    use, disposed with ``sync_engine``.
    """
    maker = _READ_ONLY_TWINS.get(sync_engine)
    return None if maker is None else maker.get(sync_engine)


def _install_query_only(engine: Engine) -> None:
    """The read-only twin: its transactions are readers, its connections query_only."""
    install_deferred_begin(engine)
    engine.update_execution_options(**{READONLY_OPTION: True})

    @event.listens_for(engine, "connect")
    def query_only(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA query_only=ON")
        finally:
            cursor.close()


def scope_options(
    engine: Engine, *, readonly: bool, isolation_level: str | None, timeout: float | None = None
) -> dict[str, Any]:
    """The execution options of the engine a scope of this kind runs on.

    ``timeout``: the scope's time budget in seconds, applied by ``_timeouts``.

    On SQLite the engine says how a transaction begins: writing scopes run on its
    ``_sqlite_gate.writer_view``, which takes the write lock at ``BEGIN IMMEDIATE``;
    read-only ones on its read-only twin (:func:`read_only_engine`), whose connections
    are ``query_only``, begin a plain ``BEGIN`` (WAL readers never wait) and carry the
    read-only option already.
    """
    options: dict[str, Any] = {}
    name = engine.dialect.name
    if readonly:
        options["postgresql_readonly" if name == "postgresql" else READONLY_OPTION] = True
    if isolation_level is not None:
        options["isolation_level"] = isolation_level
    if timeout is not None:
        options[TIMEOUT_OPTION] = check_timeout(timeout)
    return options


def scope_engine(
    engine: Any,
    sync_engine: Engine,
    *,
    readonly: bool,
    isolation_level: str | None,
    timeout: float | None = None,
) -> Any:
    """The engine a scope of this kind runs on: ``engine`` (an ``Engine`` or
    ``AsyncEngine`` whose events live on ``sync_engine``), or on SQLite its writer view
    or, for a read-only scope, its read-only twin; as a view with the
    :func:`scope_options` it does not have already; on MySQL/MariaDB
    a read-only view also starts its transactions ``READ ONLY``, and a view with a time
    budget applies it (``_timeouts``). Listeners live on the views, never on the engine,
    so the scopes that do not need them pay nothing for them."""
    if readonly:
        engine = read_only_engine(sync_engine) or engine
    elif sync_engine.dialect.name == "sqlite":
        engine = writer_view(engine)
    options = scope_options(
        sync_engine, readonly=readonly, isolation_level=isolation_level, timeout=timeout
    )
    has = engine.get_execution_options()
    options = {key: value for key, value in options.items() if has.get(key) != value}
    if not options:
        return engine
    view = engine.execution_options(**options)
    sync_view = getattr(view, "sync_engine", view)
    if readonly and sync_engine.dialect.name in ("mysql", "mariadb"):
        _install_mysql_read_only(sync_view)
    if timeout is not None:
        install_scope_timeouts(sync_view)
    return view


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
        driver_says = f"{name}: {first_line(original, engine.url)}"
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


def _install_mysql_read_only(view: Engine) -> None:
    """On the read-only view only: a ``begin`` listener on the engine itself would make
    every statement of every scope go through SQLAlchemy's event dispatch (measured:
    +12% instructions per unit of work on MariaDB), for the read-only scopes' sake."""

    @event.listens_for(view, "begin")
    def begin(connection: Connection) -> None:
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

    def __init__(
        self, settings: Settings, connect_args: Mapping[str, Any], defaults: Mapping[str, Any]
    ) -> None:
        self.settings = settings
        self.connect_args = dict(connect_args)
        self.defaults = dict(defaults)
        self.engine: Engine | None = None  # set once built; the pool connects only later

    def __call__(self, connection_record: Any = None) -> Any:
        assert self.engine is not None
        dialect = self.engine.dialect
        cargs, cparams = _masked_connect_args(
            self.engine.url, dialect, self.connect_args, self.defaults
        )
        try:
            return dialect.connect(*cargs, **cparams)
        except Exception as error:
            failure = _connect_failure(error, dialect, self.settings, self.engine.url)
        raise failure from None  # outside the except block: no driver frames, no context


def _masked_connect_args(
    url: URL, dialect: Any, connect_args: Mapping[str, Any], defaults: Mapping[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """dbsession's ``defaults`` (timeouts, prepared statements), overridden by the
    dialect's connect arguments for ``url`` (its query string), overridden by
    ``connect_args`` (as in SQLAlchemy); the password and secret options wrapped so their
    repr is masked."""
    cargs, cparams = dialect.create_connect_args(url)
    secrets = set(secrets_of(url))
    return list(cargs), {
        key: _Secret(value)
        if isinstance(value, str) and (value in secrets or is_secret_parameter(key))
        else value
        for key, value in {**defaults, **cparams, **connect_args}.items()
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
            f"Cannot open the SQLite database {url.database!r}: {first_line(error, url)}. "
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
        replica = settings.source == "replica_url"
        server, setting = ("replica", " (replica_url=)") if replica else ("server", "")
        return DatabaseUnreachableError(
            f"Cannot connect to the {backend} {server} at {where} "
            f"(database {url.database!r}, user {url.username!r}): "
            f"{first_line(error, url)}. Check that the {server} is running and that the "
            f"URL {settings.describe()}{setting} is right."
        )
    given = sorted({*url.query, *settings.engine_options.get("connect_args", {})})
    return ConfigurationError(
        f"The {backend} driver refused the connection options of {settings.describe()}"
        f"{_suspects(str(error), url) or ''} ({type(error).__name__}: {first_line(error, url)})."
        f" Fix the URL's query string or connect_args (options given: "
        f"{', '.join(given) or 'none'})."
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
