"""Nothing waits for ever: the driver timeouts every connection gets, and the per-scope
time budget of ``session_scope(timeout=...)``.

Driver defaults (each one overridable with ``timeouts=Timeouts(...)``, and any of them by
``connect_args=`` given to the factory, which win):

- ``connect`` (10 s): opening a connection (TCP, TLS, authentication). A server that
  accepts and then says nothing (a frozen host, a half-open firewall) would otherwise
  hang the first scope for ever. psycopg ``connect_timeout`` (whole seconds, at least 2),
  PyMySQL and aiomysql ``connect_timeout``; PyMySQL's wait for the server's greeting
  (under its read timeout otherwise) gets a client-side deadline (below).
- ``dead_peer`` (30 s): how long a peer that stopped acknowledging (a dropped network, a
  powered-off host) may take to be declared dead. psycopg: TCP keepalives (first probe
  after ``dead_peer / 2``, then 3 probes ``dead_peer / 6`` apart) and ``tcp_user_timeout``
  (unacknowledged data). It does not bound a slow query: the server's TCP stack keeps
  acknowledging while it works.
- ``read`` (300 s): the longest wait for the reply to any statement, COMMIT or ROLLBACK.
  A server that stopped (SIGSTOP, a stalled VM) keeps acknowledging, so keepalives never
  see it; this does. PyMySQL applies it itself (``read_timeout``); psycopg and aiomysql
  through the client-side deadlines (:func:`install_deadlines`). It also bounds the
  longest statement, hence the generous default (``read=None`` to remove it).
- ``ping`` (5 s): the pre-ping of a pooled connection. A peer that went silent after the
  connection was pooled would otherwise hang the ping, and with it the scope; past the
  bound the connection is dropped and a new one opened (itself bounded by ``connect``).
  psycopg: bounded here; PyMySQL and aiomysql: a client-side deadline.

Their expiry raises DatabaseUnreachableError (ConnectionLostError once a connection was
open). The per-scope budget (:func:`install_scope_timeouts`) raises ScopeTimeoutError,
also when the server stopped answering (a client-side deadline a little past it).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import select
import socket
import threading
import time
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, ExceptionContext
from sqlalchemy.exc import DBAPIError

from ._classify import backend_of, error_code
from ._config import Timeouts, first_line
from ._connect import call_driver
from ._errors import ConfigurationError, ConnectionLostError, ScopeTimeoutError
from ._seam import set_hook

#: Execution option of the views timed scopes run on (one per kind of scope, whatever the
#: budget): their listeners apply the budget of the scope open in this context.
TIMEOUT_OPTION = "dbsession_timeout"
_PROGRESS_STEPS = 1000
#: The statements MariaDB runs under ``SET STATEMENT ... FOR``: after any comments and
#: opening parentheses (SQLAlchemy's ``union()`` of LIMITed selects begins with one).
_TIMED_STATEMENT = re.compile(
    r"(?:\s|/\*.*?\*/|--[^\n]*(?:\n|$)|#[^\n]*(?:\n|$)|\()*"
    r"(SELECT|INSERT|UPDATE|DELETE|REPLACE|WITH|VALUES|TABLE)\b",
    re.IGNORECASE | re.DOTALL,
)


@dataclass(eq=False)
class Budget:
    """The time budget of one timed scope: ``seconds``, and its ``time.monotonic()``
    deadline ``until``, counted from the scope's start (a SQLite writer's wait for the
    write gate included)."""

    seconds: float
    until: float
    outer: Budget | None = None
    open: bool = True
    #: The session that carries it: a scope abandoned without closing its session (an
    #: interrupt before its ``with`` statement could end it) leaves no budget behind.
    owner: weakref.ref[Any] | None = None


_budget: ContextVar[Budget | None] = ContextVar("dbsession_budget", default=None)


def start_budget(seconds: float, owner: Any = None) -> Budget:
    """Make ``seconds`` the budget of the scope starting in this context, until
    :func:`end_budget`. A budget is a value, not a view or sessionmaker: any number of
    distinct budgets costs the same, in memory and per scope."""
    budget = Budget(
        seconds,
        time.monotonic() + seconds,
        _budget.get(),
        owner=None if owner is None else weakref.ref(owner),
    )
    _budget.set(budget)
    return budget


def end_budget(budget: Budget) -> None:
    """The scope of ``budget`` ended (in whatever context): the one open before it, if any,
    applies again here."""
    budget.open = False
    if _budget.get() is budget:
        _budget.set(budget.outer)


def current_budget() -> Budget | None:
    """The budget of the timed scope open in this context, or None."""
    budget = _budget.get()
    while budget is not None and (
        not budget.open or (budget.owner is not None and budget.owner() is None)
    ):
        budget = budget.outer
    return budget


def check_timeout(timeout: float) -> float:
    """``session_scope(timeout=...)`` as a float; raise ConfigurationError unless positive."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigurationError(
            f"session_scope(timeout={timeout!r}): the time budget must be a positive number "
            "of seconds (or None for no budget)."
        )
    return float(timeout)


def driver_timeouts(url: URL, timeouts: Timeouts) -> dict[str, Any]:
    """The DBAPI ``connect()`` keywords that apply ``timeouts`` with the URL's driver."""
    driver = driver_name(url)
    args: dict[str, Any] = {}
    if driver == "psycopg":
        if timeouts.connect is not None:
            args["connect_timeout"] = max(2, math.ceil(timeouts.connect))
        if timeouts.dead_peer is not None:
            args.update(
                keepalives=1,
                keepalives_idle=max(1, round(timeouts.dead_peer / 2)),
                keepalives_interval=max(1, round(timeouts.dead_peer / 6)),
                keepalives_count=3,
                tcp_user_timeout=int(timeouts.dead_peer * 1000),
            )
    elif driver in ("pymysql", "aiomysql"):
        if timeouts.connect is not None:
            args["connect_timeout"] = timeouts.connect
        if driver == "pymysql" and timeouts.read is not None:
            args["read_timeout"] = args["write_timeout"] = timeouts.read
    return args


def driver_name(url: URL) -> str:
    """The driver the URL names (``""`` if none), without loading the dialect."""
    return url.drivername.partition("+")[2]


def install_ping_timeout(engine: Engine, timeouts: Timeouts) -> None:
    """Bound psycopg's pre-ping (sync and async) by ``timeouts.ping``: past it the
    connection is closed, so the pool drops it and opens a new one."""
    if timeouts.ping is None or engine.dialect.driver != "psycopg":
        return
    limit = timeouts.ping

    def do_ping(dbapi_connection: Any) -> bool:
        run_async = getattr(dbapi_connection, "run_async", None)
        if run_async is not None:  # psycopg's AsyncConnection, under SQLAlchemy's adapter
            run_async(lambda connection: _ping_async(connection, limit))
        else:
            _ping(dbapi_connection, limit)
        return True

    set_hook(engine, "do_ping", "ping_timeout", lambda _: do_ping)


async def _ping_async(connection: Any, limit: float) -> None:
    """psycopg's async ping, as SQLAlchemy does it (an empty statement outside any
    transaction), given at most ``limit`` seconds; past that the connection is closed."""
    import psycopg

    autocommit = connection.autocommit
    try:
        if not autocommit:
            await connection.set_autocommit(True)
        await asyncio.wait_for(connection.execute(";"), limit)
        if not autocommit:
            await connection.set_autocommit(False)
    except (asyncio.TimeoutError, psycopg.Error):
        await connection.close()  # the pool sees a closed connection: a disconnect
        raise psycopg.OperationalError("the server did not answer the pre-ping") from None


def _ping(connection: Any, limit: float) -> None:
    """Send an empty query on psycopg's low-level connection and wait at most ``limit``
    seconds for its answer; close the connection and raise OperationalError past that."""
    import psycopg
    from psycopg import pq

    pgconn = connection.pgconn
    deadline = time.monotonic() + limit
    pgconn.send_query(b"")
    while pgconn.flush() != 0:  # pragma: no cover (an empty query fits the socket buffer)
        _wait_readable(pgconn.socket, deadline, connection, write=True)
    while True:
        pgconn.consume_input()
        if not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                return
            if result.status == pq.ExecStatus.FATAL_ERROR:
                connection.close()  # the pool sees a closed connection: a disconnect
                raise psycopg.OperationalError("the server refused the pre-ping")
            continue
        _wait_readable(pgconn.socket, deadline, connection)


def _wait_readable(fd: int, deadline: float, connection: Any, write: bool = False) -> None:
    import psycopg

    remaining = deadline - time.monotonic()
    ready = (
        select.select([], [fd], [], max(0.0, remaining))[1]
        if write
        else select.select([fd], [], [], max(0.0, remaining))[0]
    )
    if not ready:
        connection.close()  # the pool sees a closed connection: a disconnect
        raise psycopg.OperationalError("the server did not answer the pre-ping in time")


def install_scope_timeouts(engine: Engine) -> None:
    """Apply the budget of the timed scope open in this context (:func:`current_budget`)
    to the transactions of ``engine``: the view (execution option ``TIMEOUT_OPTION``)
    timed scopes of one kind run on (listeners there cost the other scopes nothing).

    PostgreSQL: ``SET LOCAL statement_timeout`` and ``lock_timeout``. MySQL/MariaDB: each
    statement runs as ``SET STATEMENT max_statement_time=..., innodb_lock_wait_timeout=...
    FOR ...``. SQLite: a progress handler interrupts a statement once the scope's deadline
    has passed. Every statement and lock wait of the scope is bounded by the budget;
    overrunning it raises ScopeTimeoutError.
    """
    name = backend_of(engine.dialect.name)
    if name in ("postgresql", "mysql") and engine.dialect not in _deadlined:
        _install_statement_deadlines(engine, None)  # a driver with no read deadline
    if name == "postgresql":

        @event.listens_for(engine, "begin")
        def set_local(connection: Connection) -> None:
            budget = current_budget()
            if budget is not None:
                ms = max(1, int(budget.seconds * 1000))
                connection.exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")
                connection.exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")

    elif name == "mysql":

        @event.listens_for(engine, "before_cursor_execute", retval=True)
        def bound(
            connection: Connection,
            cursor: Any,
            statement: str,
            parameters: Any,
            context: Any,
            executemany: bool,
        ) -> tuple[str, Any]:
            budget = current_budget()
            if budget is not None and _TIMED_STATEMENT.match(statement):
                seconds = budget.seconds
                statement = (
                    f"SET STATEMENT max_statement_time={seconds!r}, "
                    f"innodb_lock_wait_timeout={max(1, math.ceil(seconds))} FOR {statement}"
                )
            return statement, parameters

    elif name == "sqlite":

        @event.listens_for(engine, "begin")
        def arm(connection: Connection) -> None:
            budget = current_budget()
            if budget is not None:
                deadline = budget.until
                _progress_handler(connection, lambda: int(time.monotonic() > deadline))

        @event.listens_for(engine, "commit")
        @event.listens_for(engine, "rollback")
        def disarm(connection: Connection) -> None:
            if not connection.invalidated:  # else the pool discards the driver connection
                _progress_handler(connection, None)  # its next scope has no deadline


def install_timeout_errors(engine: Engine) -> None:
    """Raise ScopeTimeoutError for a statement of a timed scope that overran its budget
    (once per engine: a dialect-level listener, which the timed views share)."""
    name = backend_of(engine.dialect.name)
    if name not in ("postgresql", "mysql", "sqlite"):
        return

    @event.listens_for(engine, "handle_error")
    def translate(context: ExceptionContext) -> BaseException | None:
        connection = context.connection
        if connection is None or context.is_pre_ping:
            return None
        budget = current_budget()
        original = context.original_exception
        if (
            budget is None
            or not connection.get_execution_options().get(TIMEOUT_OPTION)
            or not _is_timeout(original, name)
        ):
            return None
        return ScopeTimeoutError(
            f"session_scope(timeout={budget.seconds:g}) ran out of time ({name}: "
            f"{first_line(original, engine.url)}); the scope is rolled back. Allow more "
            "time with a larger timeout=, or make the statement (or the lock holder) faster.",
            statement=context.statement,
            params=context.parameters,
            orig=original,
        )


def _progress_handler(connection: Connection, handler: Any) -> None:
    call_driver(connection.connection, "set_progress_handler", handler, _PROGRESS_STEPS)


def _is_timeout(error: BaseException, backend: str) -> bool:
    code = error_code(error, backend)
    if backend == "postgresql":
        return code in ("57014", "55P03") and "timeout" in str(error)
    if backend == "mysql":
        return code in (1969, 3024, 1205)
    return "interrupted" in str(error)


# --- client-side deadlines: a frozen server -----------------------------------------------

#: How much longer than a timed scope's budget (rounded up to whole seconds, as MariaDB's
#: ``innodb_lock_wait_timeout`` is) the client waits for a reply before it closes the
#: connection. A live server ends the statement at the budget itself
#: (``statement_timeout``, ``max_statement_time``) and says so; only a server that stopped
#: (frozen, its kernel still acknowledging) is still silent a second later.
DEADLINE_GRACE = 1.0


#: An armed deadline: when (``time.monotonic()``), the window it was armed with, the budget.
Entry = tuple[float, float, "Budget | None"]


class _Watchdog:
    """One daemon thread for the process: a reply still awaited past its deadline gets its
    connection's socket shut down, so the blocked read fails (the driver sees the
    connection closed) and SQLAlchemy invalidates the connection.

    Arming costs a statement one dict store and one float comparison; the thread wakes
    only when a deadline is due (or one sooner than its next wake is armed)."""

    def __init__(self) -> None:
        #: key (an execution context, a pooled or driver connection) -> (deadline, budget)
        self.armed: dict[Any, Entry] = {}
        #: what the thread cut, for the error handler to name (kept only while alive)
        self.expired: weakref.WeakKeyDictionary[Any, Entry] = weakref.WeakKeyDictionary()
        self.wake_at = math.inf
        #: The shortest window armed so far: while nothing is armed, the thread looks again
        #: that often, so that a statement armed meanwhile (due no sooner) need not wake it.
        self.horizon = math.inf
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._pid = 0

    def wake(self, window: float) -> None:
        """A deadline sooner than the thread's next wake was armed, ``window`` seconds from
        now (start the thread if need be)."""
        self.horizon = min(self.horizon, window)
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._event = threading.Event()
                    thread = threading.Thread(
                        target=self._run, name="dbsession-deadlines", daemon=True
                    )
                    thread.start()
                    self._pid = os.getpid()
        self._event.set()

    def forget(self) -> None:
        """In a forked child: the parent's thread and armed deadlines are not ours."""
        self.armed.clear()
        self.wake_at = math.inf
        self._pid = 0

    def _run(self) -> None:
        event = self._event
        while True:
            self.wake_at = math.inf  # an arm from now on wakes us: no deadline is missed
            event.clear()
            now = time.monotonic()
            soonest = math.inf
            for key, entry in list(self.armed.items()):
                if entry[0] > now:
                    soonest = min(soonest, entry[0])
                elif self.armed.pop(key, None) is entry:  # else its reply came just now
                    if hasattr(key, "root_connection"):  # a statement: its error names why
                        self.expired[key] = entry
                    _cut(key)
            self.wake_at = soonest = min(soonest, now + self.horizon)
            event.wait(None if soonest == math.inf else max(0.0, soonest - time.monotonic()))


_watchdog = _Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_watchdog.forget)


def _cut(key: Any) -> None:
    """Shut down the socket of ``key``'s connection (both ways): the driver's blocked read
    sees the connection closed. Nothing to do if it is closed already."""
    root = getattr(key, "root_connection", None)  # an execution context
    try:
        if root is not None:
            key = root.connection
        driver = getattr(key, "driver_connection", key)
        pgconn = getattr(driver, "pgconn", None)
        if pgconn is not None:  # psycopg, sync and async
            fd = pgconn.socket
        else:
            sock = getattr(driver, "_sock", None)  # PyMySQL
            if sock is None:
                writer = getattr(driver, "_writer", None)  # aiomysql
                sock = writer.get_extra_info("socket") if writer is not None else None
            fd = sock.fileno() if sock is not None else -1
        if fd >= 0:
            # A duplicate of the descriptor: shutdown acts on the socket itself, and the
            # driver's own descriptor is never closed under it from this thread.
            with socket.socket(fileno=os.dup(fd)) as duplicate:
                duplicate.shutdown(socket.SHUT_RDWR)
    except Exception:  # closed meanwhile: nothing left to cut
        pass


#: The dialects whose statements, COMMITs and ROLLBACKs have their deadline hooks.
_deadlined: weakref.WeakSet[Any] = weakref.WeakSet()


def _install_statement_deadlines(engine: Engine, read: float | None) -> None:
    """Bound each statement, COMMIT and ROLLBACK of ``engine`` by the budget of the timed
    scope it runs in, else by ``read`` (None: no bound outside timed scopes)."""
    watchdog = _watchdog
    armed = watchdog.armed
    monotonic = time.monotonic

    def watched(key_at: int) -> Any:
        def hook(method: Any) -> Any:
            def bounded(*args: Any) -> Any:  # SQLAlchemy passes them positionally
                budget = _budget.get()
                if budget is not None and not budget.open:
                    budget = current_budget()
                if budget is not None:
                    window = math.ceil(budget.seconds) + DEADLINE_GRACE
                elif read is None:
                    return method(*args)
                else:
                    window = read
                key = args[key_at]
                until = monotonic() + window
                armed[key] = (until, window, budget)
                if until < watchdog.wake_at:  # rarely: due before the thread looks again
                    watchdog.wake(window)
                try:
                    return method(*args)
                finally:
                    armed.pop(key, None)

            return bounded

        return hook

    for name in ("do_execute", "do_execute_no_params", "do_executemany"):
        set_hook(engine, name, "deadline", watched(-1))  # keyed by the execution context
    for name in ("do_commit", "do_rollback"):
        set_hook(engine, name, "deadline", watched(0))  # keyed by the pooled connection
    _deadlined.add(engine.dialect)


def install_deadlines(engine: Engine, timeouts: Timeouts) -> None:
    """Bound every wait for the server's reply on ``engine`` (PostgreSQL, MySQL/MariaDB)
    with a client-side deadline, which a frozen server (its kernel still acknowledging,
    so keepalives and ``tcp_user_timeout`` never fire) cannot hold past:

    - in a timed scope, each statement, COMMIT and ROLLBACK gets the scope's budget
      (rounded up to whole seconds) plus :data:`DEADLINE_GRACE`; past it the scope raises
      ScopeTimeoutError (CommitOutcomeUnknownError for a COMMIT in flight);
    - elsewhere each gets ``timeouts.read`` (PyMySQL applies that one itself, as its
      ``read_timeout``, so on PyMySQL, or with ``read=None``, the hooks are installed
      only with the engine's first timed view: the other units of work do not pay for
      them); past it, ConnectionLostError;
    - a MySQL/MariaDB pre-ping gets ``timeouts.ping`` (psycopg's has its own bound);
    - PyMySQL's wait for a new connection's greeting gets ``timeouts.connect``.

    Past a deadline the connection's socket is shut down: the connection is dropped, the
    transaction was not committed, and a server that resumes later sees it closed (no
    write of the stuck scope lands on it afterwards).
    """
    if backend_of(engine.dialect.name) not in ("postgresql", "mysql"):
        return
    driver = engine.dialect.driver
    read = None if driver == "pymysql" else timeouts.read
    if read is not None:  # else installed with the first timed view (install_scope_timeouts)
        _install_statement_deadlines(engine, read)
    armed = _watchdog.armed

    def arm(key: Any, budget: Budget | None, window: float) -> None:
        entry = (time.monotonic() + window, window, budget)
        armed[key] = entry
        if entry[0] < _watchdog.wake_at:
            _watchdog.wake(window)

    if driver != "psycopg" and timeouts.ping is not None:
        limit = timeouts.ping

        def ping_hook(ping: Any) -> Any:
            def do_ping(dbapi_connection: Any) -> Any:
                arm(dbapi_connection, None, limit)
                try:
                    return ping(dbapi_connection)
                finally:
                    armed.pop(dbapi_connection, None)

            return do_ping

        set_hook(engine, "do_ping", "deadline", ping_hook)
    if driver == "pymysql" and timeouts.connect is not None:
        within = timeouts.connect

        def greeting_hook(connect: Any) -> Any:
            def connect_within(*cargs: Any, **cparams: Any) -> Any:
                # PyMySQL reads the server's greeting under read_timeout, not
                # connect_timeout: the deadline makes ``connect`` cover the handshake.
                if cparams.get("defer_connect"):  # the application connects it
                    return connect(*cargs, **cparams)
                connection = connect(*cargs, **{**cparams, "defer_connect": True})
                arm(connection, None, within)
                try:
                    connection.connect()
                finally:
                    armed.pop(connection, None)
                return connection

            return connect_within

        set_hook(engine, "connect", "deadline", greeting_hook)


def overdue_error(context: ExceptionContext, describe: str) -> DBAPIError | None:
    """The error for a statement whose reply the watchdog stopped waiting for (see
    :func:`install_deadlines`), or None if it was not one: ScopeTimeoutError in a timed
    scope, else ConnectionLostError naming ``Timeouts.read``."""
    key = context.execution_context
    entry = _watchdog.expired.pop(key, None) if key is not None else None
    if entry is None:
        return None
    _, window, budget = entry
    original = context.original_exception
    if budget is not None:
        return ScopeTimeoutError(
            f"session_scope(timeout={budget.seconds:g}) ran out of time: {describe} did not "
            f"answer within {window:g} s, so the connection was "
            "closed and the scope is rolled back. A server that stopped (frozen, or its "
            "host stalled) looks like this; a slow statement is ended by the server itself.",
            statement=context.statement,
            params=context.parameters,
            orig=original,
            connection_invalidated=True,
        )
    return ConnectionLostError(
        f"The connection to {describe} got no answer within {window:g} s (Timeouts.read): "
        "it was closed and the transaction was not committed. The pool opens a new connection on "
        "the next use; run_in_transaction runs the unit again. Allow longer statements "
        "with a larger Timeouts(read=...), or read=None.",
        statement=context.statement,
        params=context.parameters,
        orig=original,
        connection_invalidated=True,
    )
