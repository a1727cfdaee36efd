"""Pools that know who holds their connections.

dbsession's engines use a subclass of the pool class SQLAlchemy would have chosen
(QueuePool, AsyncAdaptedQueuePool): each checkout is timed (``dbsession.pool.wait``
and the slow-scope warning), each checked-out connection remembers the call site of
the unit of work that took it, and when a checkout times out the error says how many
connections are out and which call sites hold them.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections import Counter
from typing import Any

from sqlalchemy import exc
from sqlalchemy.engine import URL
from sqlalchemy.pool import ConnectionPoolEntry, Pool, QueuePool

from . import observability
from ._errors import PoolExhaustedError

_OUTSIDE = "outside any unit of work (create_session(), engine.connect())"
_ENDED = "a unit of work that ended without returning it (an interrupted scope)"
_UNRECORDED = "unrecorded call sites (observability is off: configure(slow_scope_seconds=5))"
_made: dict[type[Pool], type[Pool]] = {}


class _HolderTracking:
    """Mixed into a QueuePool class: timed checkouts, holders by call site."""

    _dbsession_holders: dict[int, weakref.ref[observability.Observation] | None]

    def _do_get(self) -> ConnectionPoolEntry:
        started = time.perf_counter()
        try:
            record: ConnectionPoolEntry = super()._do_get()  # type: ignore[misc]
        except exc.TimeoutError as error:
            raise self._exhausted(error) from None
        finally:
            observability.add_pool_wait(time.perf_counter() - started, self._dbsession_backend)
        holders = self.__dict__.setdefault("_dbsession_holders", {})
        # Weakly: an observation holds its caller's frame (and so the session and this very
        # connection); a strong reference here would keep an abandoned one alive for ever.
        current = observability.current()
        holders[id(record)] = None if current is None else weakref.ref(current)
        return record

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        self.__dict__.get("_dbsession_holders", {}).pop(id(record), None)
        super()._do_return_conn(record)  # type: ignore[misc]

    def _exhausted(self, error: exc.TimeoutError) -> PoolExhaustedError:
        holders = Counter(
            _holder_site(holder)
            for holder in list(self.__dict__.get("_dbsession_holders", {}).values())
        )
        held = "; ".join(f"{site} ({count})" for site, count in holders.most_common(10))
        pool: Any = self
        return PoolExhaustedError(
            f"No pooled connection became free within {pool.timeout():g}s: "
            f"{pool.checkedout()} connections are checked out (pool_size={pool.size()}, "
            f"max_overflow={pool._max_overflow}), held by units of work opened at: "
            f"{held or 'unknown'}. Shorten those units of work (no slow work inside a "
            "scope), or raise pool_size= / max_overflow=."
        )

    @functools.cached_property
    def _dbsession_backend(self) -> str:
        pool: Any = self
        return str(pool._dialect.name) if hasattr(pool, "_dialect") else ""


def _holder_site(holder: weakref.ref[observability.Observation] | None) -> str:
    if holder is None:
        return _OUTSIDE if observability.enabled() else _UNRECORDED
    observation = holder()
    return _ENDED if observation is None else observation.site


def pool_class_for(url: URL, *, asyncio: bool) -> type[Pool] | None:
    """The holder-tracking subclass of the pool class SQLAlchemy would pick for ``url``,
    or None when that class is not a QueuePool (nothing is ever waited for)."""
    try:
        base = url.get_dialect(_is_async=asyncio).get_pool_class(url)  # type: ignore[attr-defined]
    except Exception:  # an unknown dialect is reported by create_engine itself
        return None
    if not issubclass(base, QueuePool):
        return None
    made = _made.get(base)
    if made is None:
        made = _made[base] = type(f"Tracked{base.__name__}", (_HolderTracking, base), {})
    return made
