"""DbSessionFactory: one engine and sessionmaker per connection string, built lazily and once."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar, TypeVar, cast

from sqlalchemy import MetaData
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from ._base import Base
from ._binding import Binding
from ._config import Settings, mask_url
from ._engine import make_engine
from ._lifecycle import DefaultOrSelf, LazyFactory
from ._retry import (
    DEFAULT_ATTEMPTS,
    DEFAULT_BASE_DELAY,
    DEFAULT_MAX_DELAY,
    RetryPolicy,
    TransactionalDecorator,
    retry_decorator,
    run_with_retries,
)
from ._scope import savepoint, unit_of_work

logger = logging.getLogger("dbsession")

T = TypeVar("T")
SyncBinding = Binding[Engine, sessionmaker[Session]]


class DbSessionFactory(LazyFactory[SyncBinding]):
    """Owns one engine and its sessionmakers for one database URL.

    The process default is configured with :meth:`global_init` (or lazily, on first
    use, from ``DATABASE_URL`` or the embedded SQLite file) and used through the class
    itself: ``DbSessionFactory.session_scope()``. Further databases get instances:
    ``reports = DbSessionFactory(url)``, which have the same methods.

    Raises ConfigurationError subclasses when the URL or options cannot work.
    """

    _default: ClassVar[DbSessionFactory | None] = None
    _default_lock: ClassVar[threading.Lock] = threading.Lock()

    @property
    def engine(self) -> Engine:
        """The engine, built on first access."""
        return self._build().engine

    @property
    def replica_engine(self) -> Engine | None:
        """The replica's engine (built on first access), or None without a replica_url."""
        return None if self._settings.replica_url is None else self._build(replica=True).engine

    def _make(self, settings: Settings) -> SyncBinding:
        engine = make_engine(settings)
        return Binding(engine, engine, sessionmaker, expire_on_commit=settings.expire_on_commit)

    def _session_scope(
        self,
        *,
        nested: bool = False,
        readonly: bool = False,
        isolation_level: str | None = None,
        timeout: float | None = None,
        replica: bool | None = None,
    ) -> AbstractContextManager[Session]:
        """Open a unit of work: a fresh Session committed on success and rolled back on any error.

        ``with DbSessionFactory.session_scope() as session: ...``. The exception that
        ended the block is re-raised unchanged after the rollback; the session is
        always closed, and ``on_commit`` hooks run after a successful commit.

        - ``nested=True``: inside an active scope of this factory (same thread or
          asyncio task, at the time of the call), join its session as a SAVEPOINT;
          an exception rolls back to the savepoint only. Elsewhere, a normal scope.
        - ``readonly=True``: a read-only transaction, ended by a rollback, on the
          replica if there is one; a write raises ReadOnlyError.
        - ``isolation_level``: e.g. ``"SERIALIZABLE"`` or ``"read_committed"`` for
          this scope's transaction only.
        - ``timeout``: a time budget in seconds for every statement and lock wait of
          this transaction; overrunning it raises ScopeTimeoutError.
        - ``replica``: ``False`` keeps a read-only scope on the primary (to see a commit
          just made); ``True`` insists on the replica. See docs/deploying.md.

        Raises UnsupportedIsolationLevelError for a level the backend does not have,
        ScopeError when a savepoint is asked to change read-only-ness or isolation,
        DatabaseUnreachableError when no connection can be opened.
        """
        return self._open_scope(
            unit_of_work,
            savepoint,
            nested=nested,
            readonly=readonly,
            isolation_level=isolation_level,
            timeout=timeout,
            replica=replica,
        )

    def _run_in_transaction(
        self,
        fn: Callable[..., T],
        *args: Any,
        attempts: int = DEFAULT_ATTEMPTS,
        base_delay: float = DEFAULT_BASE_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        readonly: bool = False,
        isolation_level: str | None = None,
    ) -> T:
        """Run ``fn(session, *args)`` in a fresh scope; retry it whole on a transient failure.

        Transient: serialization failure or deadlock (PostgreSQL 40001, 40P01), deadlock
        or lock wait timeout (MySQL/MariaDB 1213, 1205), SQLITE_BUSY. Such a failure
        rolls the attempt back and, after a jittered exponential backoff (see
        RetryPolicy), runs ``fn`` again, up to ``attempts`` times in all. Returns
        ``fn``'s result. Other errors propagate unchanged and are never retried;
        ``on_commit`` hooks run once, after the successful attempt. Each retry is
        logged at INFO. Raises RetryExhaustedError (chaining the last error) when
        every attempt failed, ConfigurationError for a bad attempts or delay.
        """
        policy = RetryPolicy(attempts, base_delay, max_delay)
        run, scope = run_with_retries, self._session_scope
        return cast(T, self._with_retries(run, scope, fn, args, policy, readonly, isolation_level))

    def _transactional(
        self,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        base_delay: float = DEFAULT_BASE_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        readonly: bool = False,
        isolation_level: str | None = None,
    ) -> TransactionalDecorator:
        """Decorator: ``@transactional()`` on ``def f(session, ...)`` makes ``f(...)`` run
        through run_in_transaction with these options (the factory is looked up at each call).

        Raises what run_in_transaction raises, when the decorated function is called.
        """
        RetryPolicy(attempts, base_delay, max_delay)  # bad options fail at decoration
        target = self

        def run(fn: Callable[[Session], Any]) -> Any:
            factory = target if target is not None else DbSessionFactory.default()
            return factory._run_in_transaction(
                fn,
                attempts=attempts,
                base_delay=base_delay,
                max_delay=max_delay,
                readonly=readonly,
                isolation_level=isolation_level,
            )

        return retry_decorator(run)

    def _create_session(self) -> Session:
        """Return a new Session that the caller commits, rolls back and closes itself."""
        return self._build().maker()()

    def _get_engine(self) -> Engine:
        """Return the engine, building it on first use."""
        return self._build().engine

    def _create_all(self, metadata: MetaData | None = None) -> None:
        """Create the missing tables of ``metadata`` (default: ``dbsession.Base.metadata``).

        A quick-start convenience; an app with migrations runs Alembic instead.
        """
        (metadata or Base.metadata).create_all(self._build().engine)

    def _dispose(self) -> None:
        """Close the pool's connections; the next use builds a new engine.

        On the class, ``DbSessionFactory.dispose()`` also forgets the process default,
        so ``global_init()`` may be called again with another URL.
        """
        for binding in self._detach():
            binding.engine.dispose()
            logger.debug("dbsession: engine disposed for %s", mask_url(binding.engine.url))

    session_scope = DefaultOrSelf(_session_scope)
    run_in_transaction = DefaultOrSelf(_run_in_transaction)
    transactional = DefaultOrSelf(_transactional, late=True)
    create_session = DefaultOrSelf(_create_session)
    get_engine = DefaultOrSelf(_get_engine)
    create_all = DefaultOrSelf(_create_all)
    dispose = DefaultOrSelf(_dispose, no_default=lambda: None)


def session_scope(
    *,
    nested: bool = False,
    readonly: bool = False,
    isolation_level: str | None = None,
    timeout: float | None = None,
    replica: bool | None = None,
) -> AbstractContextManager[Session]:
    """Open a unit of work on the process default factory; see DbSessionFactory.session_scope."""
    return DbSessionFactory.default()._session_scope(
        nested=nested,
        readonly=readonly,
        isolation_level=isolation_level,
        timeout=timeout,
        replica=replica,
    )


#: ``run_in_transaction(fn, *args, attempts=5, ...)`` on the process default, looked up at
#: each call; see DbSessionFactory.run_in_transaction.
run_in_transaction = DbSessionFactory.run_in_transaction

#: ``@transactional(attempts=5, ...)`` on the process default, looked up at each call of the
#: decorated function; see DbSessionFactory.transactional.
transactional = DbSessionFactory.transactional


def create_session() -> Session:
    """Return a new Session of the process default factory that the caller manages."""
    return DbSessionFactory.default()._create_session()
