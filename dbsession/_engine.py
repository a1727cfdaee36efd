"""Building one engine per URL with dbsession's opinions applied.

``build_engine`` composes what the other modules install, in this order: the pool
(``_pool``: its size, and who holds its connections), the creator (``_connect``: masked
secrets, named connect failures), driver timeouts (``_timeouts``), the fork guard and the
liveness check (here), statement timing (``observability``), the read-only translation
(``_readonly``), then per backend the SQLite opinions and write gate (``_sqlite``), or the
lost-connection translation (``_pooler``), Galera's refusals (``_classify``), the bounded
ping and the frozen-server deadlines (``_timeouts``). The dialect methods they hook run in the order
``_seam.ORDER`` gives. ``scope_engine`` picks the engine (or view of it) a scope of one
kind runs on.

- every backend: a fork guard so a child process never reuses its parent's pooled
  connections; a pool of ``DEFAULT_POOL_SIZE`` kept connections (``DEFAULT_MAX_OVERFLOW``
  more at a peak).
- PostgreSQL and MySQL/MariaDB: a pooled connection is checked before use without a
  round trip (:func:`_install_checkout_check`); a bare URL scheme gets the driver we ship
  (psycopg 3, PyMySQL; see ``_config``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import sqlite3
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, exc
from sqlalchemy.engine import URL, AdaptedConnection, Engine
from sqlalchemy.pool import ConnectionPoolEntry

from . import observability
from ._classify import install_cluster_errors
from ._config import Settings, first_line, scrub
from ._connect import Connector, suspects, where
from ._errors import (
    ConfigurationError,
    InvalidURLError,
    MissingDriverError,
    NeedsRollbackError,
    UnknownDialectError,
)
from ._pool import pool_class_for
from ._pooler import install_connection_loss, prepared_statement_args
from ._readonly import (
    has_read_only_twin,
    install_read_only_errors,
    install_read_only_twin,
    readonly_options,
)
from ._seam import set_hook
from ._sqlite import install_opinions, install_write_gate, prepare_url, writer_view
from ._timeouts import (
    TIMEOUT_OPTION,
    driver_timeouts,
    install_deadlines,
    install_ping_timeout,
    install_scope_timeouts,
    install_timeout_errors,
)

logger: logging.Logger = logging.getLogger("dbsession")

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
    return build_engine(settings, create_engine, lambda engine: engine)[0]


def build_engine(
    settings: Settings, create: Callable[..., E], sync_engine_of: Callable[[E], Engine]
) -> tuple[E, Callable[[], E] | None]:
    """Create an engine with ``create`` (``create_engine`` or ``create_async_engine``) and
    install dbsession's opinions on ``sync_engine_of(engine)``, where the events live.

    Returns the engine and the builder of its read-only twin (``_readonly``), which the
    caller builds on first use and disposes with the engine; None for a PostgreSQL driver
    without a read-only flag.
    Raises UnknownDialectError, MissingDriverError, SQLitePathError or ConfigurationError
    when the URL or options cannot work.
    """
    url = settings.url
    keeper: sqlite3.Connection | None = None
    is_sqlite = url.get_backend_name() == "sqlite"
    if is_sqlite:
        url, keeper = prepare_url(url)
    asyncio = create is not create_engine
    wal = keeper is None

    def build(read_only: bool = False) -> E:
        return _build(
            settings, url, create, sync_engine_of, wal=wal, asyncio=asyncio, read_only=read_only
        )

    built = build()
    if keeper is not None:
        weakref.finalize(sync_engine_of(built), keeper.close)
    logger.info("dbsession: engine created for %s", settings.describe())
    twin = has_read_only_twin(sync_engine_of(built).dialect)
    return built, (lambda: build(read_only=True)) if twin else None


def _build(
    settings: Settings,
    url: URL,
    create: Callable[..., E],
    sync_engine_of: Callable[[E], Engine],
    *,
    wal: bool,
    asyncio: bool,
    read_only: bool = False,
) -> E:
    """One engine on ``url`` (already prepared) with every opinion installed."""
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
        connector = Connector(settings, options.pop("connect_args", None) or {}, defaults)
        options["creator"] = connector
    built = _create(create, url, settings, options)
    engine = sync_engine_of(built)
    if connector is not None:
        connector.attach(engine)
    _install_fork_guard(engine)
    is_server = url.get_backend_name() != "sqlite"
    liveness = is_server and "pool_pre_ping" not in options
    _install_checkout_check(engine, settings.timeouts.ping_after_idle if liveness else None)
    _install_idle_rollback_skip(engine)
    _install_aborted_commit_refusal(engine)
    observability._watch(engine)
    install_read_only_errors(engine)
    install_timeout_errors(engine)
    if read_only:
        install_read_only_twin(engine)
    if not is_server:
        install_opinions(engine, settings.sqlite_busy_timeout, wal=wal)
        if not read_only:
            install_write_gate(engine, settings.sqlite_busy_timeout)
    else:
        hosts = where(url)
        install_connection_loss(engine, f"the {url.get_backend_name()} server {hosts}")
        if url.get_backend_name() in ("mysql", "mariadb"):
            install_cluster_errors(engine, hosts)
        install_ping_timeout(engine, settings.timeouts)
        install_deadlines(engine, settings.timeouts)
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
            f"Invalid engine option{suspects(str(error), url)} for {settings.describe()}: "
            f"{first_line(error, url)}. Check the URL's query string and the keyword "
            "arguments given to global_init() or DbSessionFactory()."
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
    """SQLAlchemy's recipe: a pooled connection is only ever used by the process that opened
    it (the check itself is :func:`_install_checkout_check`'s)."""
    _ENGINES.add(engine)

    @event.listens_for(engine, "connect")
    def remember_pid(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info[_PID] = os.getpid()


_PID = "dbsession_pid"
_CHECKED_OUT_AT = "dbsession_checked_out_at"
_POLLER = "dbsession_poller"


def _install_checkout_check(engine: Engine, ping_after_idle: float | None) -> None:
    """One ``checkout`` listener (each costs an event dispatch per unit of work): refuse a
    connection another process opened (the fork guard), then, unless ``ping_after_idle``
    is None, replace a dead pooled connection before use, without a round trip.

    SQLAlchemy's ``pool_pre_ping`` sends ``SELECT 1`` on every checkout: one full round
    trip per unit of work. A server that ends a session (a kill, a restart, an idle
    timeout) closes its socket, which the checkout sees for the cost of one ``poll()``.
    So a connection is pinged (``dialect.do_ping``) only when its socket is readable
    while idle (closed, or an error message waiting), or its last checkout was more than
    ``ping_after_idle`` seconds ago (``Timeouts``; a peer lost without a word, say behind
    a NAT that forgot it; timed from the checkout rather than the return, which spares a
    ``checkin`` listener per unit of work and pings a long-held connection a little
    early); a failed ping raises DisconnectionError, on which the pool opens a new
    connection in its place. After any disconnect seen during a statement, SQLAlchemy
    itself invalidates every connection of the pool opened before it. A driver whose
    socket cannot be found is pinged on every checkout, like ``pool_pre_ping``.
    ``pool_pre_ping=True`` (ping always) or ``False`` (check nothing) in the engine
    options replaces this check.
    """
    dialect = engine.dialect
    check_liveness = ping_after_idle is not None
    ping_after_idle = ping_after_idle or 0.0
    monotonic = time.monotonic

    @event.listens_for(engine, "checkout")
    def check(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
        info = record.info
        if info.get(_PID) != os.getpid():
            # Drop without closing: closing would end the parent's server session.
            record.dbapi_connection = proxy.dbapi_connection = None  # type: ignore[misc]
            raise exc.DisconnectionError(
                "connection was opened by another process; reconnecting in this one"
            )
        if not check_liveness:
            return
        now = monotonic()
        since = info.get(_CHECKED_OUT_AT)
        info[_CHECKED_OUT_AT] = now
        if since is None:  # just opened
            return
        if now - since < ping_after_idle and _quiet(dbapi_connection, info):
            return
        try:
            alive = dialect.do_ping(dbapi_connection)
        except Exception:
            alive = False
        if not alive:
            raise exc.DisconnectionError("the pooled connection was closed by the server")


def _install_idle_rollback_skip(engine: Engine) -> None:
    """No ROLLBACK when the driver knows, without I/O, that no transaction is open: the
    pool's reset after every COMMIT. sqlite3 and aiosqlite keep ``in_transaction``
    (aiosqlite would take a trip to its thread per unit of work for nothing); psycopg
    keeps libpq's status from every reply, and its own ``rollback()`` sends nothing when
    idle either, so only the call is spared. PyMySQL's status comes from OK packets
    only (a result set or an error after the COMMIT leaves it saying "no transaction"):
    it always gets the ROLLBACK."""
    if engine.dialect.name == "sqlite":

        def idle(driver: Any) -> bool:
            return not getattr(driver, "in_transaction", True)  # absent: roll back

    elif engine.dialect.driver == "psycopg":

        def idle(driver: Any) -> bool:
            # libpq IDLE, and psycopg in no block of its own whose rollback() it refuses
            # (a two-phase transaction, a Transaction context): the pool must then see that
            # refusal and discard the connection, which would fail every later commit.
            return (
                driver.pgconn.transaction_status == 0  # TransactionStatus.IDLE
                and not getattr(driver, "_tpc", True)
                and not getattr(driver, "_num_transactions", True)
            )

    else:
        return

    def skip_when_idle(rollback: Callable[[Any], None]) -> Callable[[Any], None]:
        def do_rollback(dbapi_connection: Any) -> None:
            if not idle(_driver(dbapi_connection)):
                rollback(dbapi_connection)

        return do_rollback

    set_hook(engine, "do_rollback", "idle", skip_when_idle)


def _install_aborted_commit_refusal(engine: Engine) -> None:
    """psycopg: refuse to COMMIT a transaction PostgreSQL has aborted (libpq INERROR). The
    server answers such a COMMIT with a ROLLBACK, which psycopg reports as a commit. A
    failed statement SQLAlchemy saw already dooms the unit of work (``_scope``); this is
    for one run on the driver's own connection, whose error was caught."""
    if engine.dialect.driver != "psycopg":
        return

    def refuse_aborted(commit: Callable[[Any], None]) -> Callable[[Any], None]:
        def do_commit(dbapi_connection: Any) -> None:
            if _driver(dbapi_connection).pgconn.transaction_status == 3:  # INERROR
                raise NeedsRollbackError(
                    "The unit of work cannot commit: a statement run on the driver's own "
                    "connection failed and its error was caught, so PostgreSQL aborted the "
                    "transaction and a COMMIT would roll it back. Nothing was saved. Let the "
                    "error propagate, or run that statement in a joined session_scope()."
                )
            commit(dbapi_connection)

        return do_commit

    set_hook(engine, "do_commit", "aborted", refuse_aborted)


def _driver(dbapi_connection: Any) -> Any:
    """The driver's connection under a pooled one (async: under SQLAlchemy's adapter)."""
    driver = getattr(dbapi_connection, "dbapi_connection", dbapi_connection)
    if isinstance(driver, AdaptedConnection):
        driver = driver.driver_connection
    return driver


def _quiet(dbapi_connection: Any, info: dict[Any, Any]) -> bool:
    """True if the idle connection's socket has nothing to read: the server has not
    closed it nor sent anything. False when that cannot be known. The poller is made
    once per driver connection (kept in the pool record's ``info``)."""
    made = info.get(_POLLER)
    if made is not None and made[0] is dbapi_connection:
        return not made[1].poll(0)
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    reader = getattr(driver, "_reader", None)  # aiomysql: asyncio reads its socket itself
    if isinstance(reader, asyncio.StreamReader):
        return not (reader.at_eof() or reader.exception() or len(reader._buffer))  # type: ignore[attr-defined]
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
    if _poll is None:  # pragma: no cover (no poll(): Windows)
        return not select.select([fd], [], [fd], 0)[0]
    poller = _poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    info[_POLLER] = (dbapi_connection, poller)
    return not poller.poll(0)


_poll = getattr(select, "poll", None)


def scope_options(
    engine: Engine, *, readonly: bool, isolation_level: str | None, timed: bool = False
) -> dict[str, Any]:
    """The execution options of the engine a scope of this kind runs on (``timed``: its
    scopes have a time budget, which ``_timeouts`` applies)."""
    options: dict[str, Any] = readonly_options(engine.dialect) if readonly else {}
    if isolation_level is not None:
        options["isolation_level"] = isolation_level
    if timed:
        options[TIMEOUT_OPTION] = True
    return options


def scope_engine(
    engine: Any,
    sync_engine: Engine,
    *,
    readonly: bool,
    isolation_level: str | None,
    timed: bool = False,
    read_only_engine: Any = None,
) -> Any:
    """The engine a scope of this kind runs on: ``engine`` (an ``Engine`` or
    ``AsyncEngine`` whose events live on ``sync_engine``); for a read-only scope
    ``read_only_engine`` (its twin, ``_readonly``); for a writing one on SQLite its writer
    view; as a view with the
    :func:`scope_options` it does not have already, and a view with a time budget applies
    it (``_timeouts``). Listeners live on the views, never on the engine, so the scopes
    that do not need them pay nothing for them."""
    if readonly and read_only_engine is not None:
        engine = read_only_engine
    elif not readonly and sync_engine.dialect.name == "sqlite":
        engine = writer_view(engine)
    options = scope_options(
        sync_engine, readonly=readonly, isolation_level=isolation_level, timed=timed
    )
    has = engine.get_execution_options()
    options = {key: value for key, value in options.items() if has.get(key) != value}
    if not options:
        return engine
    view = engine.execution_options(**options)
    if timed:
        install_scope_timeouts(getattr(view, "sync_engine", view))
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
