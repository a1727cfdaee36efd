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
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from ._errors import SQLiteWriteLockTimeoutError

__all__ = ["WriteGate", "busy_error", "gate_for", "gate_key"]

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

    def take_if_free(self) -> bool:
        """Take the gate if it is free and nobody waits (True); else change nothing."""
        with self._lock:
            if self._held or self._waiters:
                return False
            self._held = True
            return True

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

    def acquire(self, stall: float, until: float | None = None) -> bool:
        """Block this thread until it holds the gate (True), or until the ``time.monotonic()``
        deadline ``until`` has passed (False: it left the queue). See the class for what
        it raises."""
        waiter = self._enter_or_queue(lambda: _Waiter(threading.Event()))
        if waiter is None:
            return True
        assert waiter.event is not None
        try:
            seen = self._handoffs
            while not waiter.event.wait(_wait_for(stall, until)):
                if _passed(until):
                    return self._give_up(waiter, None)
                if self._give_up(waiter, seen, stall):
                    return True
                seen = self._handoffs
            return True
        except BaseException:
            self._give_up(waiter, None)
            raise

    async def acquire_async(self, stall: float, until: float | None = None) -> bool:
        """Wait (without blocking the event loop) until this task holds the gate; as
        :meth:`acquire` otherwise."""
        loop = asyncio.get_running_loop()
        waiter = self._enter_or_queue(lambda: _Waiter(loop=loop, future=loop.create_future()))
        if waiter is None:
            return True
        assert waiter.future is not None
        try:
            seen = self._handoffs
            while True:
                done, _ = await asyncio.wait({waiter.future}, timeout=_wait_for(stall, until))
                if done:
                    return True
                if _passed(until):
                    return self._give_up(waiter, None)
                if self._give_up(waiter, seen, stall):
                    return True
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


def _wait_for(stall: float, until: float | None) -> float:
    return stall if until is None else max(0.0, min(stall, until - time.monotonic()))


def _passed(until: float | None) -> bool:
    return until is not None and time.monotonic() >= until


def busy_error(key: str, stall: float) -> sqlite3.OperationalError:
    """The driver-level error carried (as ``orig``) by SQLiteWriteLockTimeoutError:
    SQLite's own ``SQLITE_BUSY``, so code reading the driver's error sees what it knows."""
    error = sqlite3.OperationalError(
        f"database is locked (the write lock of {key!r} did not change hands for {stall:g} s)"
    )
    error.sqlite_errorcode = 5  # type: ignore[attr-defined]
    error.sqlite_errorname = "SQLITE_BUSY"  # type: ignore[attr-defined]
    return error


def _reset_after_fork() -> None:
    """In a forked child every gate is free: the threads that held or awaited one are
    not there (gunicorn ``--preload`` with a background thread inside a writing scope),
    and the child starts its engines on empty pools."""
    global _GATES_LOCK
    _GATES_LOCK = threading.Lock()
    for gate in list(_GATES.values()):
        gate._lock = threading.Lock()
        gate._held = False
        gate._waiters.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
