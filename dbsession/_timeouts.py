"""Nothing waits for ever: the driver timeouts every connection gets, and the per-scope
time budget of ``session_scope(timeout=...)``.

Driver defaults (each one overridable with ``timeouts=Timeouts(...)``, and any of them by
``connect_args=`` given to the factory, which win):

- ``connect`` (10 s): opening a connection (TCP, TLS, authentication). A server that
  accepts and then says nothing (a frozen host, a half-open firewall) would otherwise
  hang the first scope for ever. psycopg ``connect_timeout`` (whole seconds, at least 2),
  PyMySQL and aiomysql ``connect_timeout``.
- ``dead_peer`` (30 s): how long a peer that stopped acknowledging (a dropped network, a
  powered-off host) may take to be declared dead. psycopg: TCP keepalives (first probe
  after ``dead_peer / 2``, then 3 probes ``dead_peer / 6`` apart) and ``tcp_user_timeout``
  (unacknowledged data). It does not bound a slow query: the server's TCP stack keeps
  acknowledging while it works.
- ``read`` (300 s, PyMySQL only): the longest wait for any reply. PyMySQL has no
  keepalives, so this is what bounds a silent server; it also bounds the longest
  statement, hence the generous default (``read=None`` to remove it).
- ``ping`` (5 s, psycopg): the pre-ping of a pooled connection. A peer that went silent
  after the connection was pooled would otherwise hang the ping, and with it the scope;
  past the bound the connection is dropped and a new one opened (itself bounded by
  ``connect``).

Their expiry raises DatabaseUnreachableError (ConnectionLostError once a connection was
open). The per-scope budget (:func:`install_scope_timeouts`) raises ScopeTimeoutError.
"""

from __future__ import annotations

import asyncio
import math
import re
import select
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, ExceptionContext

from ._classify import backend_of, error_code
from ._config import Timeouts, first_line
from ._connect import call_driver
from ._errors import ConfigurationError, ScopeTimeoutError
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


_budget: ContextVar[Budget | None] = ContextVar("dbsession_budget", default=None)


def start_budget(seconds: float) -> Budget:
    """Make ``seconds`` the budget of the scope starting in this context, until
    :func:`end_budget`. A budget is a value, not a view or sessionmaker: any number of
    distinct budgets costs the same, in memory and per scope."""
    budget = Budget(seconds, time.monotonic() + seconds, _budget.get())
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
    while budget is not None and not budget.open:
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
