"""The lock-safe migration runner: each statement waits a short time for its lock, and a
migration that cannot get it gives way to the traffic, then tries again.

Why: ``ALTER TABLE`` needs an exclusive lock. While it waits behind a long transaction,
every later query on that table queues behind the ALTER (PostgreSQL's lock queue, MariaDB's
metadata-lock queue), so the site stalls for as long as that transaction lives.

- PostgreSQL: ``SET LOCAL lock_timeout`` in the migration's transaction. A statement that
  times out (SQLSTATE 55P03) or loses a deadlock (40P01) aborts the transaction: it is rolled
  back (its locks and the migration lock go with it, so traffic flows) and the whole run
  starts again after a pause, from the revision the database is at.
- MySQL/MariaDB: ``SET SESSION lock_wait_timeout, innodb_lock_wait_timeout`` (whole seconds).
  DDL commits by itself there, so only the statement that timed out (error 1205) is run
  again; a DML statement only while ``innodb_rollback_on_timeout`` is off (else the server
  has rolled its transaction back, and the error is raised).
- SQLite: nothing (one writer at a time; dbsession's busy timeout applies).

While a statement waits, a watcher on a second connection asks the server who blocks it
(``pg_blocking_pids`` and ``pg_stat_activity``; on MariaDB, whose metadata locks are not
visible without ``performance_schema``, the sessions with an open InnoDB transaction), so
the warning before each retry and the final MigrationBlockedError name them.

On PostgreSQL the runner also runs ``CONCURRENTLY`` statements outside the migration's
transaction (``_concurrently``).
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from ._classify import backend_of, error_code
from ._concurrently import is_concurrent, run_outside_transaction
from ._errors import ConfigurationError, MigrationBlockedError

#: The lock wait of each migration statement when nothing else is configured.
DEFAULT_SECONDS = 3.0
LOCK_WAIT_ENV = "DBSESSION_MIGRATION_LOCK_WAIT"
#: Lock timeout and deadlock: the statement did not get its lock.
_LOCK_FAILURES: dict[str, frozenset[str | int]] = {
    "postgresql": frozenset({"55P03", "40P01"}),
    "mysql": frozenset({1205, 1213}),
}
_DDL = re.compile(r"\s*(ALTER|CREATE|DROP|RENAME|TRUNCATE|OPTIMIZE)\b", re.IGNORECASE)
logger: logging.Logger = logging.getLogger("dbsession")


@dataclass(frozen=True)
class LockWait:
    """How long each migration statement waits for its lock, and how often a migration that
    could not get it tries again (docs/migrations.md, "Lock-safe upgrades").

    ``seconds``: each statement's lock wait (PostgreSQL ``lock_timeout``; MySQL/MariaDB
    ``lock_wait_timeout`` and ``innodb_lock_wait_timeout``, rounded up to whole seconds);
    ``0`` turns the runner off, so statements wait as long as the server lets them.
    ``attempts``: tries before MigrationBlockedError. ``backoff``: the pause after the first
    failed try, doubled after each (with jitter), at most ``max_backoff``. Raises
    ConfigurationError for a value that cannot work.
    """

    seconds: float = DEFAULT_SECONDS
    attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        for name in ("seconds", "backoff", "max_backoff"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigurationError(
                    f"LockWait({name}={value!r}): give a number of seconds >= 0."
                )
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigurationError(
                f"LockWait(attempts={self.attempts!r}): give a whole number >= 1."
            )

    @property
    def enabled(self) -> bool:
        """False for ``seconds=0``: no lock wait is set and nothing is retried."""
        return self.seconds > 0

    def pause(self, failed_attempt: int) -> float:
        """The jittered pause (seconds) after attempt number ``failed_attempt`` failed."""
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** (failed_attempt - 1))
        return ceiling * random.uniform(0.5, 1.0)


def lock_wait_of(value: float | LockWait | None, *, source: str = "lock_wait") -> LockWait:
    """The LockWait for ``value``: itself; a number of seconds; None for
    DBSESSION_MIGRATION_LOCK_WAIT (seconds), else the default. Raises ConfigurationError."""
    if isinstance(value, LockWait):
        return value
    if value is None:
        raw = os.environ.get(LOCK_WAIT_ENV, "").strip()
        if not raw:
            return LockWait()
        value, source = _seconds(raw, LOCK_WAIT_ENV), LOCK_WAIT_ENV
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(
            f"{source}={value!r}: give a number of seconds (0 turns the lock wait off) "
            "or a dbsession.migrations.LockWait."
        )
    try:
        return LockWait(seconds=float(value))
    except ConfigurationError:
        raise ConfigurationError(
            f"{source}={value!r}: give a number of seconds >= 0 (0 turns the lock wait off)."
        ) from None


def _seconds(raw: str, source: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ConfigurationError(
            f"{source}={raw!r} is not a number of seconds (0 turns the lock wait off)."
        ) from None


@dataclass(frozen=True)
class Blocker:
    """A session that held the lock a migration statement waited for."""

    pid: int
    who: str
    state: str
    open_for: float | None
    query: str

    def __str__(self) -> str:
        opened = "" if self.open_for is None else f", transaction open {self.open_for:.0f} s"
        query = f", query {self.query!r}" if self.query else ""
        return f"server process {self.pid} ({self.who}, {self.state}{opened}{query})"


_PG_BLOCKERS = text(
    "SELECT a.pid, coalesce(nullif(a.usename, ''), '?') || '@' || "
    "coalesce(host(a.client_addr), 'local') AS who, coalesce(a.state, '') AS state, "
    "extract(epoch FROM clock_timestamp() - a.xact_start)::float AS open_for, "
    "left(coalesce(a.query, ''), 200) AS query "
    "FROM pg_stat_activity a WHERE a.pid = ANY(pg_blocking_pids(:pid)) ORDER BY a.xact_start"
)
_MYSQL_WAITING = text(
    "SELECT 1 FROM information_schema.PROCESSLIST WHERE ID = :pid AND "
    "(STATE LIKE 'Waiting for%lock%' OR ID IN (SELECT trx_mysql_thread_id FROM "
    "information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'))"
)
_MYSQL_OPEN_TRANSACTIONS = text(
    "SELECT p.ID, CONCAT(p.USER, '@', SUBSTRING_INDEX(p.HOST, ':', 1)), "
    "TRIM(CONCAT(p.COMMAND, ' ', COALESCE(p.STATE, ''))), "
    "TIMESTAMPDIFF(SECOND, t.trx_started, NOW()), LEFT(COALESCE(p.INFO, ''), 200) "
    "FROM information_schema.INNODB_TRX t "
    "JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id "
    "WHERE p.ID NOT IN (:pid, CONNECTION_ID()) AND COALESCE(p.STATE, '') NOT LIKE 'Waiting for%' "
    "ORDER BY t.trx_started LIMIT 5"
)


class _Watcher:
    """A thread with its own connection that records who blocks the migration's session."""

    def __init__(self, engine: Engine, backend: str, interval: float) -> None:
        self._engine = engine
        self._backend = backend
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pid: int | None = None
        self.blockers: tuple[Blocker, ...] = ()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dbsession-lock-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        try:
            with self._engine.connect() as raw:
                connection = raw.execution_options(isolation_level="AUTOCOMMIT")
                while not self._stop.wait(self._interval):
                    if self.pid is not None:
                        found = self._look(connection, self.pid)
                        if found:
                            self.blockers = found
        except SQLAlchemyError as error:  # the migration goes on; its error names no one
            logger.warning("dbsession: cannot watch the migration's lock waits (%s)", error)

    def _look(self, connection: Connection, pid: int) -> tuple[Blocker, ...]:
        if self._backend == "postgresql":
            rows = connection.execute(_PG_BLOCKERS, {"pid": pid}).all()
        elif connection.execute(_MYSQL_WAITING, {"pid": pid}).first() is None:
            return ()
        else:
            rows = connection.execute(_MYSQL_OPEN_TRANSACTIONS, {"pid": pid}).all()
        return tuple(
            Blocker(int(r[0]), str(r[1]), str(r[2]) or "?", _float(r[3]), str(r[4] or ""))
            for r in rows
        )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


class LockSafeRunner:
    """Runs a migration body under the lock wait of ``policy``, retrying it when a statement
    could not get its lock, on connections of ``engine`` (a NullPool engine it may also use
    for the watcher's connection)."""

    def __init__(self, engine: Engine, policy: LockWait, *, lock_key: int) -> None:
        self._engine = engine
        self._policy = policy
        self._lock_key = lock_key
        self._backend = backend_of(engine.dialect.name)
        self._connection: Connection | None = None
        self._given_up = 0  # attempts of the statement that MySQL/MariaDB gave up on
        self._given_up_blockers: tuple[Blocker, ...] = ()
        interval = min(0.2, max(0.02, policy.seconds / 4))
        self._watcher = _Watcher(engine, self._backend, interval)
        self._dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        self._rollback_on_timeout = False

    def run(self, body: Callable[[Connection], None]) -> None:
        """Call ``body(connection)`` until it returns, a new connection per attempt.

        ``body`` takes the migration lock, then calls :meth:`arm`, then migrates. Raises
        MigrationBlockedError when a statement could not get its lock in any attempt;
        every other error passes through.
        """
        if self._backend not in _LOCK_FAILURES:
            with self._engine.connect() as connection:
                body(connection)
            return
        with self._hooked():
            attempt = 1
            while True:
                with self._engine.connect() as connection:
                    self._connection = connection
                    try:
                        body(connection)
                        return
                    except DBAPIError as error:
                        if not self._is_lock_failure(error):
                            raise
                        retry = (
                            self._policy.enabled
                            and not self._given_up
                            and self._backend == "postgresql"
                            and attempt < self._policy.attempts
                        )
                        if not retry:
                            raise self._blocked(error, max(attempt, self._given_up)) from error
                        self._wait_before_retry(attempt, error.statement)
                attempt += 1

    def arm(self, connection: Connection) -> None:
        """Set the lock wait on the migration's connection; call it after the migration
        lock is taken (whose own wait is longer). On MySQL/MariaDB it ends the transaction
        its statements began, so Alembic still manages its own."""
        if self._backend not in _LOCK_FAILURES:
            return
        if self._backend == "postgresql":
            self._watcher.pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
            if self._policy.enabled:
                connection.execute(text(f"SET LOCAL lock_timeout = '{self.pg_timeout}'"))
            return
        self._watcher.pid = connection.execute(text("SELECT CONNECTION_ID()")).scalar_one()
        if self._policy.enabled:
            seconds = int(self.seconds)
            connection.execute(
                text(
                    f"SET SESSION lock_wait_timeout = {seconds}, "
                    f"innodb_lock_wait_timeout = {seconds}"
                )
            )
            self._rollback_on_timeout = bool(
                connection.execute(text("SELECT @@innodb_rollback_on_timeout")).scalar()
            )
        connection.commit()

    @property
    def seconds(self) -> float:
        """The lock wait the server applies: MySQL/MariaDB's is whole seconds."""
        if self._backend == "mysql" and self._policy.enabled:
            return float(max(1, math.ceil(self._policy.seconds)))
        return self._policy.seconds

    @property
    def pg_timeout(self) -> str:
        """The PostgreSQL ``lock_timeout`` value of the policy (``0`` when it is off)."""
        return f"{max(1, round(self._policy.seconds * 1000))}ms" if self._policy.enabled else "0"

    @contextmanager
    def _hooked(self) -> Iterator[None]:
        event.listen(self._engine, "do_execute", self._execute)
        if self._policy.enabled:
            self._watcher.start()
        try:
            yield
        finally:
            self._watcher.stop()
            event.remove(self._engine, "do_execute", self._execute)

    def _execute(self, cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        """The do_execute hook: runs the migration connection's statements that need more
        than ``cursor.execute``; returns False (SQLAlchemy executes) for the others."""
        connection: Connection | None = None if context is None else context.root_connection
        if connection is None or connection is not self._connection:
            return False
        if self._backend == "postgresql":
            if not is_concurrent(statement):
                self._watcher.blockers = ()
                return False
            dbapi_connection = connection.connection.dbapi_connection
            run_outside_transaction(
                dbapi_connection, cursor, statement, parameters,
                lock_key=self._lock_key, lock_timeout=self.pg_timeout,
            )  # fmt: skip
            return True
        self._execute_mysql(cursor, statement, parameters)
        return True

    def _execute_mysql(self, cursor: Any, statement: str, parameters: Any) -> None:
        attempt = 1
        while True:
            self._watcher.blockers = ()
            try:
                cursor.execute(statement, parameters)
                return
            except self._dbapi_error as error:
                code = error_code(error, "mysql")
                if code not in _LOCK_FAILURES["mysql"]:
                    raise
                # InnoDB rolls a deadlock victim's whole transaction back, and a lock wait
                # timeout's too under innodb_rollback_on_timeout: only a DDL statement, which
                # commits by itself, can then run again alone.
                alone = _DDL.match(statement) is not None or (
                    code == 1205 and not self._rollback_on_timeout
                )
                if not (self._policy.enabled and alone and attempt < self._policy.attempts):
                    self._given_up = attempt
                    self._given_up_blockers = self._watcher.blockers
                    raise
                self._wait_before_retry(attempt, statement)
                attempt += 1

    def _is_lock_failure(self, error: DBAPIError) -> bool:
        return error_code(error, self._backend) in _LOCK_FAILURES[self._backend]

    def _wait_before_retry(self, attempt: int, statement: str | None) -> None:
        pause = self._policy.pause(attempt)
        logger.warning(
            "dbsession: migration statement %s did not get its lock within %g s "
            "(attempt %d of %d)%s; everything it held is released, trying again in %.1f s",
            _short(statement),
            self.seconds,
            attempt,
            self._policy.attempts,
            _blocked_by(self._watcher.blockers),
            pause,
        )
        time.sleep(pause)

    def _blocked(self, error: DBAPIError, attempts: int) -> MigrationBlockedError:
        blockers = self._given_up_blockers or self._watcher.blockers
        waited = (
            f"each waited {self.seconds:g} s" if self._policy.enabled else "the lock wait is off"
        )
        blocked = MigrationBlockedError(
            f"A migration statement could not get its lock in {attempts} attempt(s) "
            f"({waited}): {_short(error.statement)}{_blocked_by(blockers)}. The migration "
            "was stopped: on PostgreSQL nothing of this run stayed, on MySQL/MariaDB the "
            "statements before it did. End that transaction or wait for it, then run the "
            "upgrade again; or give it longer: lock_wait=LockWait(seconds=..., attempts=...), "
            f"--lock-wait/--lock-attempts, or {LOCK_WAIT_ENV}.",
            orig=error.orig,
            statement=error.statement,
            params=error.params,
        )
        blocked.blockers = blockers
        blocked.attempts = attempts
        return blocked


def _short(statement: str | None) -> str:
    flat = " ".join((statement or "").split())
    return repr(flat if len(flat) <= 200 else flat[:197] + "...")


def _blocked_by(blockers: tuple[Blocker, ...]) -> str:
    if not blockers:
        return ""
    return "; blocked by " + "; ".join(str(blocker) for blocker in blockers)
