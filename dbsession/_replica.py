"""Which server a new scope runs on, when the factory has a ``replica_url``.

- A writing scope: always the primary.
- A read-only scope: the replica, unless
  - ``replica=False`` was asked (a read that must see the caller's own recent commit);
  - it asks for SERIALIZABLE: a hot standby cannot run it (PostgreSQL refuses with
    0A000), so by default the scope runs on the primary; ``replica=True`` with
    SERIALIZABLE raises UnsupportedIsolationLevelError instead;
  - ``max_replica_lag`` is set and the replica is further behind than that, or cannot be
    asked: the primary answers instead, unless the scope insists on the replica
    (``replica=True``), which raises ReplicaLagError rather than read the primary. The
    lag is measured on the replica as the age of the last replayed transaction,
    ``now() - pg_last_xact_replay_timestamp()``, or 0 when everything received has been
    replayed (an idle primary), at most once a second. A replica whose WAL receiver is
    not streaming (cut off from the primary, or not yet reconnected) is infinitely
    behind: what it has replayed says nothing about what the primary has since
    committed. (A link cut silently still reads "streaming" until the replica's
    ``wal_receiver_timeout``, 60 s by default, drops it.)

A replica that is down makes read-only scopes fail fast with DatabaseUnreachableError
naming the replica and its setting, ``replica_url=`` (connect timeout, see
``_timeouts``); once it is back, pre-ping replaces the dead pooled connections and the
next scopes work.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from ._config import Settings, Timeouts, mask_url, sync_twin
from ._errors import (
    ConfigurationError,
    ReplicaLagError,
    ScopeError,
    UnsupportedIsolationLevelError,
)
from ._timeouts import driver_timeouts

_PROBE_INTERVAL = 1.0
_LAG_SQL = text(
    "SELECT CASE "
    "WHEN NOT EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming') "
    "THEN 'Infinity'::float8 "
    "WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
    "ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0) END"
)


class _LagProbe:
    """The replica's lag, measured with a small engine of its own (sync, NullPool, so it
    serves sync and async factories alike) and remembered for a second."""

    def __init__(self, settings: Settings) -> None:
        url = sync_twin(settings.for_replica().url)
        quick = driver_timeouts(url, Timeouts(connect=2, read=2))
        self._engine: Engine = create_engine(url, poolclass=NullPool, connect_args=quick)
        self._lock = threading.Lock()
        self._measured_at = -_PROBE_INTERVAL
        self._lag = float("inf")
        weakref.finalize(self, self._engine.dispose)

    def lag(self) -> float:
        """Seconds the replica is behind; infinity when it cannot be asked."""
        with self._lock:
            if time.monotonic() - self._measured_at >= _PROBE_INTERVAL:
                self._lag = self._measure()
                self._measured_at = time.monotonic()
            return self._lag

    def _measure(self) -> float:
        try:
            with self._engine.connect() as connection:
                return float(connection.execute(_LAG_SQL).scalar_one())
        except Exception:
            return float("inf")


_PROBES: weakref.WeakKeyDictionary[Any, _LagProbe] = weakref.WeakKeyDictionary()
_PROBES_LOCK = threading.Lock()


def use_replica(
    owner: Any,
    settings: Settings,
    *,
    readonly: bool,
    replica: bool | None,
    isolation_level: str | None,
) -> bool:
    """Whether a new scope of ``owner`` (a factory with ``settings``) runs on the replica.

    Raises ConfigurationError for ``replica=True`` without a replica_url or in a writing
    scope, UnsupportedIsolationLevelError for ``replica=True`` with SERIALIZABLE, and
    ReplicaLagError for ``replica=True`` when the replica is further behind than
    ``max_replica_lag`` (or not streaming, or cannot be asked).
    """
    if replica and (settings.replica_url is None or not readonly):
        raise ConfigurationError(
            "session_scope(replica=True) needs readonly=True and a factory with a "
            "replica_url=; writing scopes always run on the primary."
        )
    if not readonly or settings.replica_url is None or replica is False:
        return False
    if isolation_level == "SERIALIZABLE":
        if replica:
            raise UnsupportedIsolationLevelError(
                f"The replica {mask_url(settings.replica_url)} is a hot standby, which cannot "
                "run SERIALIZABLE transactions: use isolation_level='REPEATABLE READ' on the "
                "replica, or leave replica= unset to run SERIALIZABLE scopes on the primary."
            )
        return False
    if settings.max_replica_lag is None:
        return True
    lag = _probe(owner, settings).lag()
    if lag <= settings.max_replica_lag:
        return True
    if replica:
        behind = (
            "is not streaming from the primary or cannot be asked"
            if lag == float("inf")
            else f"is {lag:.1f}s behind"
        )
        raise ReplicaLagError(
            f"session_scope(replica=True) insists on the replica {mask_url(settings.replica_url)}, "
            f"which {behind} (max_replica_lag={settings.max_replica_lag}). Leave replica= "
            "unset to read the primary meanwhile, or retry later."
        )
    return False


def refuse_for_savepoint(*, timeout: float | None, replica: bool | None) -> None:
    """A savepoint joins the outer transaction, on its server and with its budget: raise
    ScopeError if it is asked for a time budget or a server of its own."""
    if timeout is not None or replica is not None:
        raise ScopeError(
            "session_scope(timeout=/replica=) inside another scope: it joins that scope as "
            "a SAVEPOINT, sharing its transaction, server and time budget. Give them to the "
            "outer scope, or pass independent=True for a separate transaction."
        )


def _probe(owner: Any, settings: Settings) -> _LagProbe:
    probe = _PROBES.get(owner)
    if probe is None:
        with _PROBES_LOCK:
            probe = _PROBES.get(owner)
            if probe is None:
                probe = _PROBES[owner] = _LagProbe(settings)
    return probe
