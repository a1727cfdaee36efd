"""SQLite's opinions: the database file, the pragmas, how transactions begin, the write gate.

- **The file.** A relative path is resolved once, when the engine is built (``_connect``):
  a later ``os.chdir`` cannot split one factory's writes between two files. Its folder
  must exist and be writable (WAL writes ``-wal`` and ``-shm`` files beside it). An in-memory
  database becomes a named ``memdb`` one, so the threads of the pool (several connections)
  see one database, kept alive as long as the engine.
- **The pragmas**, once per connection: ``foreign_keys=ON``, a busy timeout, WAL for files.
- **BEGIN.** dbsession (not pysqlite) begins transactions on the raw connection, from the
  dialect's ``do_begin`` (a hook of ``_seam``), so SAVEPOINT works. The connections of a
  writing scope (:func:`writer_view`) first take the database's in-process write gate
  (``_sqlite_gate``), then send ``BEGIN IMMEDIATE``; every other connection
  (``engine.connect()``, Alembic, the read-only twin) sends a plain deferred ``BEGIN`` (a
  reader until it writes), and none at all under ``AUTOCOMMIT``.
- **Cancellation.** A statement interrupted by task cancellation (aiosqlite runs it in a
  thread of its own) is stopped and its transaction ended at once.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, AdaptedConnection, Engine, ExceptionContext
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from . import observability
from ._connect import call_driver
from ._errors import ScopeTimeoutError, SQLitePathError
from ._seam import Method, flagged_view, set_hook
from ._sqlite_gate import busy_error, gate_for, gate_key
from ._timeouts import current_budget

logger: logging.Logger = logging.getLogger("dbsession")

_HELD = "dbsession_write_gate"
_WRITER = "dbsession_writer"


def prepare_url(url: URL) -> tuple[URL, sqlite3.Connection | None]:
    """Validate and absolutise a file path, or turn an in-memory URL into a shared
    ``memdb`` one (with the connection that keeps it alive, to close with the engine)."""
    database = url.database or ""
    if database in ("", ":memory:"):
        name = f"file:/dbsession-{uuid.uuid4().hex}?vfs=memdb"
        keeper = sqlite3.connect(name, uri=True, check_same_thread=False)
        return url.set(database=name).update_query_dict({"uri": "true"}), keeper
    if database.startswith("file:"):
        return url, None
    _check_path(Path(database).expanduser())
    return url, None


def _check_path(path: Path) -> None:
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


def install_opinions(engine: Engine, busy_timeout: float, *, wal: bool) -> None:
    """The pragmas of every connection, and the interruption of a cancelled statement."""

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
        connection = context.connection.connection
        try:
            for step in ("interrupt", "rollback"):
                call_driver(connection, step)
        except Exception:
            logger.debug("dbsession: interrupting the cancelled statement failed", exc_info=True)


def install_readers_only(engine: Engine) -> None:
    """Begin every transaction of ``engine`` (the read-only twin) as a reader."""
    set_hook(engine, "do_begin", "sqlite_begin", lambda _: begin_reader)


def install_write_gate(engine: Engine, busy_timeout: float) -> None:
    """Make the writing transactions of ``engine`` (those of :func:`writer_view`) queue on
    the write gate of its database; the others begin a plain ``BEGIN``.

    ``do_begin`` takes the gate (without blocking the event loop on an async engine),
    then sends ``BEGIN IMMEDIATE``; a driver error there is wrapped by SQLAlchemy as any
    statement's is (an ``OperationalError`` for ``SQLITE_BUSY``), so retries recognise it.
    A writer gives up when the gate has not moved for twice ``busy_timeout``: its holder
    may wait up to the busy timeout in SQLite for another process before its transaction
    even begins, then gets as long again for its work. A timed scope's writer also gives
    up when its budget runs out (ScopeTimeoutError). The gate is released once the
    transaction has ended: after the driver's COMMIT succeeded (not in the commit event,
    which runs before it: the next writer must find SQLite's lock free), after any
    rollback (the pool's reset on return included), and when the connection is
    invalidated, closed, detached or checked in still holding it.
    """
    gate = gate_for(gate_key(engine.url.database or ""))
    stall = 2 * busy_timeout
    is_async = bool(engine.dialect.is_async)

    def do_begin(dbapi_connection: Any) -> None:
        info = dbapi_connection.info
        if not info.pop(_WRITER, False) or _autocommit(dbapi_connection):
            begin_reader(dbapi_connection)
            return
        if _HELD not in info and not gate.take_if_free():
            budget = current_budget()
            until = None if budget is None else budget.until
            started = time.perf_counter()
            try:
                if is_async:
                    held = dbapi_connection.dbapi_connection.run_async(
                        lambda _: gate.acquire_async(stall, until)
                    )
                else:
                    held = gate.acquire(stall, until)
            finally:
                observability._add_lock_wait(time.perf_counter() - started)
            if not held:
                assert budget is not None
                raise ScopeTimeoutError(
                    f"session_scope(timeout={budget.seconds:g}) ran out of time waiting for the "
                    f"write lock of the SQLite database {gate.key!r}, which another writer of "
                    "this process held; the scope is rolled back. Allow more time with a "
                    "larger timeout=, or keep writing transactions short.",
                    orig=busy_error(gate.key, budget.seconds),
                    statement="BEGIN IMMEDIATE",
                )
        info[_HELD] = gate
        try:
            execute_raw(dbapi_connection, "BEGIN IMMEDIATE")
        except Exception:
            _release(info)  # no transaction was opened
            raise

    def commit_then_release(commit: Method) -> Method:
        def do_commit(dbapi_connection: Any) -> None:
            commit(dbapi_connection)  # a failed COMMIT leaves the transaction open: keep it
            _release_of(dbapi_connection)

        return do_commit

    def rollback_then_release(rollback: Method) -> Method:
        def do_rollback(dbapi_connection: Any) -> None:
            try:
                rollback(dbapi_connection)
            except Exception:
                _release_of(dbapi_connection)
                raise
            # A cancelled ROLLBACK (BaseException) may still be running in aiosqlite's
            # thread: the gate stays until SQLAlchemy invalidates the connection, whose
            # hook below rolls back again, waiting for it.
            _release_of(dbapi_connection)

        return do_rollback

    set_hook(engine, "do_begin", "sqlite_begin", lambda _: do_begin)
    set_hook(engine, "do_commit", "sqlite_gate", commit_then_release)
    set_hook(engine, "do_rollback", "sqlite_gate", rollback_then_release)

    @event.listens_for(engine, "invalidate")
    @event.listens_for(engine, "soft_invalidate")
    @event.listens_for(engine, "detach")
    def end_then_release(dbapi_connection: Any, record: Any, *_: Any) -> None:
        # The connection leaves the pool's care: end its transaction before the gate
        # moves (a closed SQLite connection with a statement still referenced stays
        # open and keeps its lock).
        try:
            if _HELD in record.info and dbapi_connection is not None:
                _end_transaction(dbapi_connection)
        finally:
            _release(record.info)  # whatever happened: a gate never released is a deadlock

    @event.listens_for(engine, "checkin")
    @event.listens_for(engine, "close")
    def release_left_over(dbapi_connection: Any, record: Any) -> None:
        if _HELD in record.info:  # rarely: COMMIT and ROLLBACK release it
            end_then_release(dbapi_connection, record)


def writer_view(engine: Any) -> Any:
    """A view of the SQLite ``engine`` (an ``Engine`` or ``AsyncEngine`` with the write
    gate) whose transactions are writers: the engine of writing scopes."""
    sync_engine: Engine = getattr(engine, "sync_engine", engine)
    view = flagged_view(sync_engine, _WRITER)
    return view if sync_engine is engine else type(engine)(view)


def begin_reader(connection: PoolProxiedConnection) -> None:
    """A plain ``BEGIN``: a reader, which takes no lock until it reads and never waits in
    WAL mode; nothing on a connection set to AUTOCOMMIT."""
    if not _autocommit(connection):
        execute_raw(connection, "BEGIN")


def _autocommit(connection: PoolProxiedConnection) -> bool:
    """True if SQLAlchemy set the driver connection to AUTOCOMMIT (``isolation_level=
    "AUTOCOMMIT"``): then no BEGIN, each statement commits by itself. Otherwise the
    driver's own implicit BEGIN never fires, as do_begin has begun the transaction."""
    return connection.dbapi_connection.isolation_level is None  # type: ignore[union-attr]


def _release_of(connection: Any) -> None:
    """Release the gate held by a proxied connection's transaction, if any (a raw one, or
    the ad-hoc proxy SQLAlchemy uses while first connecting, has no pool record)."""
    try:
        info = connection.info if isinstance(connection, PoolProxiedConnection) else None
    except NotImplementedError:
        return
    _release(info)


def _release(info: dict[Any, Any] | None) -> None:
    gate = info.pop(_HELD, None) if info is not None else None
    if gate is not None:
        gate.release()


def _end_transaction(dbapi_connection: Any) -> None:
    """Roll back whatever the driver connection has open, finalising its statements
    first; failures are logged, never raised (the connection is being dropped)."""
    try:
        dbapi_connection.rollback()
    except Exception:
        logger.debug("dbsession: rolling back a dropped SQLite connection failed", exc_info=True)


def execute_raw(connection: PoolProxiedConnection, statement: str) -> None:
    """Run a parameterless ``statement`` on the driver connection of the pool's
    ``connection``, without SQLAlchemy's execution path."""
    driver: Any = connection.dbapi_connection
    if type(driver) is sqlite3.Connection:  # one C call (its cursor is freed at once)
        driver.execute(statement)
        return
    if isinstance(driver, AdaptedConnection):  # aiosqlite: one trip to its thread, not three
        driver.run_async(lambda aiosqlite_connection: aiosqlite_connection.execute(statement))
        return
    cursor = driver.cursor()
    try:
        cursor.execute(statement)
    finally:
        cursor.close()
