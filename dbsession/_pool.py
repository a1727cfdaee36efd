"""Pools that know who holds their connections.

dbsession's engines use a subclass of the pool class SQLAlchemy would have chosen
(QueuePool, AsyncAdaptedQueuePool; made by ``_seam.tracked_pool_class``): each checkout is
timed (``dbsession.pool.wait`` and the slow-scope warning), each checked-out connection
remembers the call site of the unit of work that took it, and when a checkout times out
the error says how many connections are out and which call sites hold them.
"""

from __future__ import annotations

import functools
import weakref
from collections import Counter
from typing import Any

from sqlalchemy import exc
from sqlalchemy.engine import URL
from sqlalchemy.pool import Pool, QueuePool

from . import observability
from ._errors import PoolExhaustedError
from ._readonly import is_twin_pool
from ._seam import dialect_class, max_overflow, tracked_pool_class

_OUTSIDE = "outside any unit of work (create_session(), engine.connect())"
_ENDED = "a unit of work that ended without returning it (an interrupted scope)"
_UNRECORDED = "unrecorded call sites (observability is off: configure(slow_scope_seconds=5))"
_made: dict[tuple[type[Pool], str], type[Pool]] = {}


class _Watcher:
    """Times checkouts and names holders for the pools of one backend."""

    def __init__(self, backend: str) -> None:
        self.taken = functools.partial(observability._add_pool_wait, backend=backend)

    def exhausted(self, pool: Pool, error: exc.TimeoutError, holders: list[object]) -> Exception:
        sites = Counter(_holder_site(holder) for holder in holders)
        held = "; ".join(f"{site} ({count})" for site, count in sites.most_common(10))
        queue: Any = pool
        which = (
            "of the read-only scopes (a pool of their own, sized as the writers') "
            if is_twin_pool(pool)
            else ""
        )
        return PoolExhaustedError(
            f"No pooled connection {which}became free within "
            f"{queue.timeout():g}s: {queue.checkedout()} connections are checked out "
            f"(pool_size={queue.size()}, max_overflow={max_overflow(queue)}), held by units "
            f"of work opened at: {held or 'unknown'}. Shorten those units of work (no slow "
            "work inside a scope), or raise pool_size= / max_overflow=."
        )


def _holder_site(holder: object) -> str:
    if not isinstance(holder, weakref.ref):
        return _OUTSIDE if observability._enabled() else _UNRECORDED
    observation = holder()
    return _ENDED if observation is None else observation.site


def pool_class_for(url: URL, *, asyncio: bool) -> type[Pool] | None:
    """The holder-tracking subclass of the pool class SQLAlchemy would pick for ``url``,
    or None when that class is not a QueuePool (nothing is ever waited for)."""
    try:
        dialect = dialect_class(url, asyncio=asyncio)
        base = dialect.get_pool_class(url)
    except Exception:  # an unknown dialect is reported by create_engine itself
        return None
    if not issubclass(base, QueuePool):
        return None
    key = (base, str(dialect.name))
    made = _made.get(key)
    if made is None:
        made = _made[key] = tracked_pool_class(base, _Watcher(key[1]))
    return made
