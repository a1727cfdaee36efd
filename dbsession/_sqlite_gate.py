"""The in-process write gate of an SQLite database: writers queue here, not in SQLite.

SQLite lets one writer at a time hold a database's write lock; the others wait in
its busy handler, which sleeps in growing steps and is not fair, so under CPU
pressure one waiter can starve past the busy timeout while later ones get in. So
every writing transaction of this process on one database first takes that
database's :class:`WriteGate`, a first-in first-out lock shared by all the
engines (sync and async) of the process on that database, and only then sends
``BEGIN IMMEDIATE``. It keeps the gate until its transaction has ended (commit,
rollback, or its connection invalidated or closed). Between writers of this
process SQLite's busy handler is therefore never used; it is left to other
processes writing the same file.

A thread waits for the gate blocking; an asyncio task waits without blocking its
event loop. A writer waits as long as the gate keeps changing hands: it fails with
:class:`~dbsession.errors.SQLiteWriteLockTimeoutError` (an SQLAlchemy ``OperationalError``
that ``run_in_transaction`` retries like ``SQLITE_BUSY``) only when the gate was held
by one and the same transaction for twice the database's busy timeout (its holder may
first wait up to the busy timeout in SQLite for another process). A
writing transaction opened inside another on the same database (not nested as a
SAVEPOINT) waits for itself, and so fails after the busy timeout, as it does in
SQLite itself.

The gate is keyed by the database: the real path of a file (symbolic links and
relative paths resolved), or the name of an in-memory ``memdb`` database.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.base import OptionEngine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import await_only

from ._errors import SQLiteWriteLockTimeoutError

__all__ = [
    "WriteGate",
    "execute_raw",
    "gate_for",
    "gate_key",
    "install_deferred_begin",
    "install_write_gate",
    "writer_view",
]

logger: logging.Logger = logging.getLogger("dbsession")

_GATES: weakref.WeakValueDictionary[str, WriteGate] = weakref.WeakValueDictionary()
_GATES_LOCK = threading.Lock()


def gate_key(database: str) -> str:
    """The key of the database named by a SQLite URL's database part.

    A file's real path; for a ``file:`` URI, its path, unless it names an in-memory
    database (``vfs=memdb`` or ``mode=memory``), which is keyed by the whole name.
    """
    if database.startswith("file:"):
        parts = urlsplit(database)
        query = parse_qs(parts.query)
        if query.get("vfs") == ["memdb"] or query.get("mode") == ["memory"]:
            return database
        return os.path.realpath(parts.path or database[len("file:") :])
    return os.path.realpath(os.path.expanduser(database))


def gate_for(key: str) -> WriteGate:
    """The one gate of this process for the database ``key`` (made on first use).

    Every engine using it keeps a reference; the gate is forgotten with the last one.
    """
    with _GATES_LOCK:
        gate = _GATES.get(key)
        if gate is None:
            gate = _GATES[key] = WriteGate(key)
        return gate


@dataclass(eq=False)
class _Waiter:
    event: threading.Event | None = None
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[None] | None = None
    granted: bool = field(default=False)

    def wake(self) -> bool:
        """Tell the waiter it holds the gate; False if it can no longer be told."""
        if self.event is not None:
            self.event.set()
            return True
        assert self.loop is not None and self.future is not None
        try:
            self.loop.call_soon_threadsafe(_resolve, self.future)
        except RuntimeError:  # its event loop is closed: nobody is waiting any more
            return False
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class WriteGate:
    """A first-in first-out lock for one SQLite database, for threads and asyncio tasks.

    The gate is handed directly to the longest waiter on release, so nobody can
    overtake a waiter. ``acquire`` and ``acquire_async`` raise
    SQLiteWriteLockTimeoutError when the gate did not change hands for ``stall``
    seconds.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self._lock = threading.Lock()
        self._held = False
        self._waiters: deque[_Waiter] = deque()
        self._handoffs = 0

    def __repr__(self) -> str:
        return f"<WriteGate {self.key!r} held={self._held} waiting={len(self._waiters)}>"

    def _enter_or_queue(self, make: Callable[[], _Waiter]) -> _Waiter | None:
        """Take the gate if it is free and nobody waits (None), else queue ``make()``."""
        with self._lock:
            if not self._held and not self._waiters:
                self._held = True
                return None
            waiter: _Waiter = make()
            self._waiters.append(waiter)
            return waiter

    def _give_up(self, waiter: _Waiter, seen: int | None, stall: float = 0.0) -> bool:
        """After a wait ended without a wake-up: True if the waiter holds the gate anyway.

        With ``seen`` (the hand-off count when the wait began) it stays queued if the
        gate changed hands meanwhile (``seen`` updated by the caller); without, it
        leaves the queue (cancelled), passing the gate on if it was just granted.
        """
        with self._lock:
            if waiter.granted:
                if seen is None:
                    self._pass_on()
                return seen is not None
            if seen is not None and self._handoffs != seen:
                return False
            if waiter in self._waiters:  # not after a timeout already dequeued it
                self._waiters.remove(waiter)
        if seen is not None:
            raise SQLiteWriteLockTimeoutError(
                f"database is locked: the write lock of the SQLite database {self.key!r} was "
                f"held by one transaction of this process for {stall:g} s (twice the busy "
                "timeout) while this writer waited. Keep writing transactions short, or "
                "raise sqlite_busy_timeout.",
                orig=busy_error(self.key, stall),
                statement="BEGIN IMMEDIATE",
            )
        return False

    def acquire(self, stall: float) -> None:
        """Block this thread until it holds the gate (see the class for what it raises)."""
        waiter = self._enter_or_queue(lambda: _Waiter(threading.Event()))
        if waiter is None:
            return
        assert waiter.event is not None
        try:
            seen = self._handoffs
            while not waiter.event.wait(stall):
                if self._give_up(waiter, seen, stall):
                    return
                seen = self._handoffs
        except BaseException:
            self._give_up(waiter, None)
            raise

    async def acquire_async(self, stall: float) -> None:
        """Wait (without blocking the event loop) until this task holds the gate."""
        loop = asyncio.get_running_loop()
        waiter = self._enter_or_queue(lambda: _Waiter(loop=loop, future=loop.create_future()))
        if waiter is None:
            return
        assert waiter.future is not None
        try:
            seen = self._handoffs
            while True:
                done, _ = await asyncio.wait({waiter.future}, timeout=stall)
                if done or self._give_up(waiter, seen, stall):
                    return
                seen = self._handoffs
        except BaseException:
            self._give_up(waiter, None)
            raise

    def release(self) -> None:
        """Hand the gate to the longest waiter, or leave it free."""
        with self._lock:
            self._pass_on()

    def _pass_on(self) -> None:
        self._handoffs += 1
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.granted = True
            if waiter.wake():
                return
        self._held = False


def busy_error(key: str, stall: float) -> sqlite3.OperationalError:
    """The driver-level error carried (as ``orig``) by SQLiteWriteLockTimeoutError:
    SQLite's own ``SQLITE_BUSY``, so code reading the driver's error sees what it knows."""
    error = sqlite3.OperationalError(
        f"database is locked (the write lock of {key!r} did not change hands for {stall:g} s)"
    )
    error.sqlite_errorcode = 5  # type: ignore[attr-defined]
    error.sqlite_errorname = "SQLITE_BUSY"  # type: ignore[attr-defined]
    return error


_HELD = "dbsession_write_gate"


_WRITER = "dbsession_writer"


class _WriterConnection(Connection):
    """A connection of :func:`writer_view`: its transaction will begin as a writer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection.info[_WRITER] = True  # read (and dropped) by do_begin


class _WriterEngine(OptionEngine):
    _connection_cls = _WriterConnection


_WriterEngine._option_cls = _WriterEngine  # its own views are writers too


def writer_view(engine: Any) -> Any:
    """A view of the SQLite ``engine`` (an ``Engine`` or ``AsyncEngine`` with the write
    gate) whose transactions are writers: the engine of writing scopes."""
    sync_engine: Engine = getattr(engine, "sync_engine", engine)
    view = _WriterEngine(sync_engine, {})
    return view if sync_engine is engine else type(engine)(view)


def install_write_gate(engine: Engine, database: str, busy_timeout: float) -> None:
    """Make the writing transactions of ``engine`` (those of :func:`writer_view`) queue on
    the gate of ``database``; the others begin a plain ``BEGIN`` (a reader until it writes).

    The dialect's ``do_begin`` takes the gate (without blocking the event loop on an
    async engine), then sends ``BEGIN IMMEDIATE`` on the driver connection: a method of
    the dialect rather than a ``begin`` listener, which would send every statement of
    every scope through SQLAlchemy's event dispatch (measured: +10% instructions per
    one-query unit of work). A driver error raised there is wrapped by SQLAlchemy as any
    statement's is (an ``OperationalError`` for ``SQLITE_BUSY``), so retries recognise it.
    A writer gives up when the gate has not moved for twice ``busy_timeout``: its holder
    may wait up to the busy timeout in SQLite for another process before its transaction
    even begins, then gets as long again for its work. The gate is released once the
    transaction has ended: after the driver's commit succeeded, after any rollback (the
    pool's reset on return included), and when the connection is invalidated, closed,
    detached or checked in still holding it.
    """
    gate = gate_for(gate_key(database))
    stall = 2 * busy_timeout
    dialect = engine.dialect
    is_async = bool(dialect.is_async)
    commit, rollback = dialect.do_commit, dialect.do_rollback

    def do_begin(dbapi_connection: Any) -> None:
        info = dbapi_connection.info
        if not info.pop(_WRITER, False) or _autocommit(dbapi_connection):
            begin_reader(dbapi_connection)
            return
        if _HELD not in info:
            if is_async:
                await_only(gate.acquire_async(stall))
            else:
                gate.acquire(stall)
            info[_HELD] = gate
        try:
            execute_raw(dbapi_connection, "BEGIN IMMEDIATE")
        except Exception:
            _release(info)  # no transaction was opened
            raise

    def do_commit(dbapi_connection: Any) -> None:
        commit(dbapi_connection)  # a failed COMMIT leaves the transaction open: keep the gate
        _release(_info_of(dbapi_connection))

    def do_rollback(dbapi_connection: Any) -> None:
        try:
            rollback(dbapi_connection)
        except Exception:
            _release(_info_of(dbapi_connection))
            raise
        # A cancelled ROLLBACK (BaseException) may still be running in aiosqlite's
        # thread: the gate stays until SQLAlchemy invalidates the connection, whose
        # hook below rolls back again, waiting for it.
        _release(_info_of(dbapi_connection))

    # After the driver's COMMIT/ROLLBACK, not in the commit/rollback events, which
    # run before it: the next writer must find SQLite's lock free.
    setattr(dialect, "do_begin", do_begin)  # noqa: B010
    setattr(dialect, "do_commit", do_commit)  # noqa: B010
    setattr(dialect, "do_rollback", do_rollback)  # noqa: B010

    @event.listens_for(engine, "invalidate")
    @event.listens_for(engine, "soft_invalidate")
    @event.listens_for(engine, "detach")
    def end_then_release(dbapi_connection: Any, record: Any, *_: Any) -> None:
        # The connection leaves the pool's care: end its transaction before the gate
        # moves (a closed SQLite connection with a statement still referenced stays
        # open and keeps its lock).
        try:
            if _HELD in record.info and dbapi_connection is not None:
                end_transaction(dbapi_connection)
        finally:
            _release(record.info)  # whatever happened: a gate never released is a deadlock

    @event.listens_for(engine, "checkin")
    @event.listens_for(engine, "close")
    def release_left_over(dbapi_connection: Any, record: Any) -> None:
        record.info.pop(_WRITER, None)  # a writer's connection closed before it began
        end_then_release(dbapi_connection, record)


def install_deferred_begin(engine: Engine) -> None:
    """Begin every transaction of ``engine`` (a read-only twin) as a reader."""
    setattr(engine.dialect, "do_begin", begin_reader)  # noqa: B010


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


def _info_of(connection: Any) -> dict[Any, Any] | None:
    """The pool record's ``info`` of a proxied connection; None for a raw one, or for
    the ad-hoc proxy SQLAlchemy uses while first connecting (which has none)."""
    try:
        return connection.info if isinstance(connection, PoolProxiedConnection) else None
    except NotImplementedError:
        return None


def _release(info: dict[Any, Any] | None) -> None:
    gate = info.pop(_HELD, None) if info is not None else None
    if gate is not None:
        gate.release()


def end_transaction(dbapi_connection: Any) -> None:
    """Roll back whatever the driver connection has open, finalising its statements
    first; failures are logged, never raised (the connection is being dropped)."""
    try:
        dbapi_connection.rollback()
    except Exception:
        logger.debug("dbsession: rolling back a dropped SQLite connection failed", exc_info=True)


def execute_raw(connection: PoolProxiedConnection, statement: str) -> None:
    """Run a parameterless ``statement`` on the driver connection of the pool's
    ``connection``, without SQLAlchemy's execution path."""
    cursor = connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(statement)
    finally:
        cursor.close()
