"""The one seam between dbsession and SQLAlchemy's internals.

Everything else in the package uses SQLAlchemy's public API and events. What no public
API serves without a cost on every statement lives here, each touch point tested by
``tests/test_seam.py`` (run on the floor and the newest SQLAlchemy) so that an upgrade
that stops calling one fails there, never silently:

- **Dialect methods** (``connect``, ``do_begin``, ``do_commit``, ``do_rollback``,
  ``do_ping`` and the ``do_execute*`` trio). A ``begin``/``commit``/``before_cursor_execute``
  listener would send every statement of the engine through SQLAlchemy's event dispatch
  (measured: +10% instructions per one-query unit of work), so each engine's dialect gets
  one wrapper per method that runs its hooks in the order :data:`ORDER` gives.
  :func:`set_hook` is the only writer of dialect attributes, and it refuses a method the
  dialect class no longer has.
- **Flagged connections** (SQLite's writers): a view of an engine whose connections flag
  their pooled connection just before each ``BEGIN`` (``do_begin`` sees only that), via
  ``OptionEngine``, its ``_connection_cls`` and ``Connection._begin_impl``. The public
  ways cost more: a ``begin`` or ``engine_connect`` listener on the view (event dispatch
  for every statement of every scope on it), or a second engine sharing the pool (split
  apart by ``dispose()`` and ``fork()``).
- **The driver's read-only flag** (``Dialect.set_readonly``, undocumented): what
  ``postgresql_readonly`` sets, so that the driver's own ``BEGIN`` says ``READ ONLY``;
  set once on each connection of PostgreSQL's read-only twin.
- **The dialect of a URL** as ``create_async_engine`` picks it (``URL.get_dialect``'s
  ``_is_async``): the pool class to subclass.
- **Sync code that may await in an async engine** (``sqlalchemy.util.greenlet_spawn``):
  disposing an async pool outside a session, after a demoted primary's refusal.
- **Pool checkouts** (``QueuePool._do_get``/``_create_connection``, the record's
  ``in_use``, ``_max_overflow``): the time spent waiting for a connection, who holds each
  one, and the timeout's error. The ``checkout`` event comes after the wait and never
  sees the timeout.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy import exc
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.engine.base import OptionEngine
from sqlalchemy.pool import ConnectionPoolEntry, Pool, QueuePool
from sqlalchemy.util import greenlet_spawn

__all__ = [
    "ORDER",
    "PoolWatcher",
    "dialect_class",
    "flagged_view",
    "in_greenlet",
    "max_overflow",
    "pool_holders",
    "set_driver_read_only",
    "set_hook",
    "tracked_pool_class",
]

Method = Callable[..., Any]
#: A hook: given the next function of the chain (the dialect's own method, innermost),
#: the function that replaces it.
Hook = Callable[[Method], Method]

#: Every hooked dialect method and its hooks by name, outermost first: what runs around
#: what. ``sqlite_begin`` and ``ping_timeout`` replace the dialect's own method.
ORDER: dict[str, tuple[str, ...]] = {
    "connect": ("deadline",),
    "do_begin": ("sqlite_begin",),
    "do_commit": ("sqlite_gate", "aborted", "commit_error", "deadline"),
    "do_rollback": ("sqlite_gate", "idle", "deadline"),
    "do_ping": ("ping_timeout", "deadline"),
    "do_execute": ("statement_timer", "deadline"),
    "do_execute_no_params": ("statement_timer", "deadline"),
    "do_executemany": ("statement_timer", "deadline"),
}

_hooks: weakref.WeakKeyDictionary[Any, dict[str, dict[str, Hook]]] = weakref.WeakKeyDictionary()
_hooks_lock = threading.Lock()


def set_hook(engine: Engine, method: str, name: str, hook: Hook | None) -> None:
    """Install (or with None remove) the hook ``name`` on ``method`` of ``engine``'s dialect,
    and rebuild that method's chain in :data:`ORDER`.

    Raises RuntimeError if the dialect class has no such method (SQLAlchemy changed it:
    the hook would never run).
    """
    dialect = engine.dialect
    own = getattr(type(dialect), method, None)
    if not callable(own) or name not in ORDER.get(method, ()):
        raise RuntimeError(
            f"dbsession cannot hook {type(dialect).__name__}.{method} ({name}): SQLAlchemy "
            "no longer has that method; this SQLAlchemy version is not supported."
        )
    with _hooks_lock:
        methods = _hooks.setdefault(dialect, {})
        installed = methods.setdefault(method, {})
        if hook is None:
            installed.pop(name, None)
        else:
            installed[name] = hook
        chain: Method = own.__get__(dialect)
        for hook_name in reversed(ORDER[method]):
            wrap = installed.get(hook_name)
            if wrap is not None:
                chain = wrap(chain)
        if installed:
            vars(dialect)[method] = chain
        else:
            vars(dialect).pop(method, None)


class _FlaggingConnection(Connection):
    """A connection of :func:`flagged_view`: flags its pooled connection as each of its
    transactions begins, before the ``begin`` listeners and the dialect's ``do_begin``
    (which takes the flag)."""

    _dbsession_flag = ""

    def _begin_impl(self, transaction: Any) -> None:
        self.connection.info[self._dbsession_flag] = True
        super()._begin_impl(transaction)


_views: dict[str, type[OptionEngine]] = {}


def flagged_view(engine: Engine, flag: str) -> Engine:
    """A view of ``engine`` (sharing its pool, dialect and options) whose every connection
    sets ``info[flag] = True`` on its pooled connection as each transaction begins,
    before anything of the transaction runs (its own views do the same)."""
    view_class = _views.get(flag)
    if view_class is None:
        connection_class = type(
            "FlaggingConnection", (_FlaggingConnection,), {"_dbsession_flag": flag}
        )
        view_class = type("FlaggingEngine", (OptionEngine,), {"_connection_cls": connection_class})
        view_class._option_cls = view_class
        _views[flag] = view_class
    return view_class(engine, {})


def set_driver_read_only(dialect: Any, dbapi_connection: Any, value: bool) -> None:
    """Set the driver connection's read-only flag, as SQLAlchemy's ``postgresql_readonly``
    does (psycopg, psycopg2 and asyncpg then begin their transactions ``READ ONLY``)."""
    dialect.set_readonly(dbapi_connection, value)


class PoolWatcher(Protocol):
    """What a tracked pool reports (``_pool`` implements it): one call per checkout, on
    every unit of work's path, and one per checkout timeout."""

    def taken(self, waited: float) -> object:
        """A connection was taken after ``waited`` seconds (None: the checkout timed out);
        what it returns is kept as the connection's holder until its next checkout."""

    def exhausted(self, pool: Pool, error: exc.TimeoutError, holders: list[object]) -> Exception:
        """The error to raise for a checkout timeout; ``holders``: of each connection
        checked out now, what ``taken`` returned for it."""


_RECORDS = "_dbsession_records"
_HOLDER = "dbsession_holder"


def tracked_pool_class(base: type[QueuePool], watcher: PoolWatcher) -> type[QueuePool]:
    """A subclass of ``base`` that tells ``watcher`` of each connection taken (with the
    seconds its checkout waited) and raises ``watcher.exhausted()`` on a checkout timeout,
    with the holders of the connections then checked out (each pooled connection is
    remembered, weakly, when it is made: a return costs nothing)."""
    taken = watcher.taken

    class Tracked(base):  # type: ignore[valid-type,misc]
        def _create_connection(self) -> ConnectionPoolEntry:
            record: ConnectionPoolEntry = super()._create_connection()
            self.__dict__.setdefault(_RECORDS, weakref.WeakSet()).add(record)
            return record

        def _do_get(self) -> ConnectionPoolEntry:
            started = time.perf_counter()
            try:
                record: ConnectionPoolEntry = super()._do_get()
            except exc.TimeoutError as error:
                taken(time.perf_counter() - started)
                raise watcher.exhausted(self, error, pool_holders(self)) from None
            # record_info, not info: SQLAlchemy clears info when the record reconnects
            # (invalidated, recycled, found dead at checkout) after _do_get returned it.
            record.record_info[_HOLDER] = taken(time.perf_counter() - started)  # type: ignore[index]
            return record

    Tracked.__name__ = Tracked.__qualname__ = f"Tracked{base.__name__}"
    return Tracked


def pool_holders(pool: Pool) -> list[object]:
    """The holders (what the watcher's ``taken`` returned) of the connections of a tracked
    ``pool`` that are checked out now."""
    records: Any = pool.__dict__.get(_RECORDS, ())
    return [record.record_info.get(_HOLDER) for record in list(records) if record.in_use]


async def in_greenlet(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` where SQLAlchemy's async adapters may await (what an async
    engine runs its sync internals in)."""
    return await greenlet_spawn(fn, *args)


def dialect_class(url: URL, *, asyncio: bool) -> Any:
    """The dialect class of ``url`` as ``create_engine`` (``asyncio``:
    ``create_async_engine``) would pick it: psycopg's URL names both."""
    return url.get_dialect(_is_async=asyncio)


def max_overflow(pool: QueuePool) -> int:
    """The pool's ``max_overflow`` (SQLAlchemy has no public getter)."""
    return int(pool._max_overflow)
