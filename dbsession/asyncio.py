"""The async twins of dbsession's factory and unit of work, for asyncio applications.

``async with async_session_scope() as session:`` gives a real SQLAlchemy
``AsyncSession``; leaving the block commits, any exception (a cancelled task or an
``asyncio.timeout`` included) rolls back, and the connection is back in the pool
before the exception leaves the block.

The URL is resolved as on the sync side (argument > ``DATABASE_URL`` > the embedded
SQLite file); a URL that names no driver gets the async one of its backend
(``sqlite+aiosqlite``, ``postgresql+psycopg`` in its async mode, ``mysql+aiomysql``).
The engine gets the same opinions as the sync one. Needs ``pip install 'dbsession[async]'``
(and ``dbsession[postgres]`` for PostgreSQL). ``import dbsession`` never imports this module.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, TypeVar, cast

from sqlalchemy import MetaData
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from ._async_scope import async_savepoint, async_unit_of_work
from ._base import Base
from ._binding import Binding
from ._config import Settings, mask_url
from ._context import session_of_scope
from ._engine import build_engine
from ._errors import MissingDriverError
from ._lifecycle import DefaultOrSelf, LazyFactory
from ._retry import (
    DEFAULT_ATTEMPTS,
    DEFAULT_BASE_DELAY,
    DEFAULT_MAX_DELAY,
    RetryPolicy,
    run_with_retries_async,
)

__all__ = [
    "AsyncDbSessionFactory",
    "async_run_in_transaction",
    "async_session_scope",
    "create_async_session",
    "current_async_session",
]

logger = logging.getLogger("dbsession")

T = TypeVar("T")


AsyncBinding = Binding[AsyncEngine, async_sessionmaker[AsyncSession]]


class AsyncDbSessionFactory(LazyFactory[AsyncBinding]):
    """Owns one AsyncEngine and its async_sessionmaker for one database URL.

    The async twin of :class:`dbsession.DbSessionFactory`: the process default is
    configured with :meth:`global_init` (or lazily from ``DATABASE_URL`` or the
    embedded SQLite file) and used through the class,
    ``AsyncDbSessionFactory.async_session_scope()``; further databases get instances
    with the same methods. The engine is built on first use, exactly once even when
    many tasks (or threads) race for it.

    Raises ConfigurationError subclasses when the URL or options cannot work,
    MissingDriverError naming ``pip install 'dbsession[async]'`` when an async driver
    or greenlet is missing.
    """

    _asyncio: ClassVar[bool] = True
    _default: ClassVar[AsyncDbSessionFactory | None] = None
    _default_lock: ClassVar[threading.Lock] = threading.Lock()

    @property
    def engine(self) -> AsyncEngine:
        """The AsyncEngine, built on first access."""
        return self._build().engine

    def _make(self, settings: Settings) -> AsyncBinding:
        _require_greenlet()
        engine = build_engine(settings, create_async_engine, _sync_engine)
        expire = settings.expire_on_commit
        return Binding(engine, engine.sync_engine, async_sessionmaker, expire_on_commit=expire)

    @property
    def replica_engine(self) -> AsyncEngine | None:
        """The replica's AsyncEngine (built on first access), or None without a replica_url."""
        return None if self._settings.replica_url is None else self._build(replica=True).engine

    def _async_session_scope(
        self,
        *,
        nested: bool = False,
        readonly: bool = False,
        isolation_level: str | None = None,
        timeout: float | None = None,
        replica: bool | None = None,
    ) -> AbstractAsyncContextManager[AsyncSession]:
        """Open a unit of work: a fresh AsyncSession committed on success, rolled back on error.

        ``async with AsyncDbSessionFactory.async_session_scope() as session: ...``. Any
        exception, ``asyncio.CancelledError`` and timeouts included, rolls back and is
        re-raised unchanged once the session is closed and its connection back in the
        pool; ``on_commit`` hooks run after a successful commit. ``nested``,
        ``readonly`` and ``isolation_level`` mean what they mean for
        ``DbSessionFactory.session_scope``: a SAVEPOINT joined to this task's innermost
        scope of this factory; a read-only transaction (on the replica if there is one)
        where a write raises ReadOnlyError; this transaction's isolation level.
        It raises what ``session_scope`` raises.
        """
        return self._open_scope(
            async_unit_of_work,
            async_savepoint,
            nested=nested,
            readonly=readonly,
            isolation_level=isolation_level,
            timeout=timeout,
            replica=replica,
        )

    async def _run_in_transaction(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        attempts: int = DEFAULT_ATTEMPTS,
        base_delay: float = DEFAULT_BASE_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        readonly: bool = False,
        isolation_level: str | None = None,
    ) -> T:
        """Run ``await fn(session, *args)`` in a fresh scope; retry it whole on a transient failure.

        The async twin of ``DbSessionFactory.run_in_transaction``: the same transient
        errors (see ``dbsession.run_in_transaction``), the same jittered backoff
        (awaited with ``asyncio.sleep``, so other tasks run meanwhile), ``on_commit``
        hooks once after the successful attempt. Returns ``fn``'s result. Raises
        RetryExhaustedError (chaining the last error) when every attempt failed,
        ConfigurationError for a bad attempts or delay; other errors, cancellation
        included, propagate unchanged.
        """
        policy = RetryPolicy(attempts, base_delay, max_delay)
        run, scope = run_with_retries_async, self._async_session_scope
        result = self._with_retries(run, scope, fn, args, policy, readonly, isolation_level)
        return cast(T, await result)

    def _create_session(self) -> AsyncSession:
        """Return a new AsyncSession that the caller commits, rolls back and closes itself."""
        return self._build().maker()()

    def _get_engine(self) -> AsyncEngine:
        """Return the AsyncEngine, building it on first use."""
        return self._build().engine

    async def _create_all(self, metadata: MetaData | None = None) -> None:
        """Create the missing tables of ``metadata`` (default: ``dbsession.Base.metadata``).

        A quick-start convenience; an app with migrations runs Alembic instead.
        """
        async with self._build().engine.begin() as connection:
            await connection.run_sync((metadata or Base.metadata).create_all)

    async def _dispose(self) -> None:
        """Close the pool's connections; the next use builds a new engine.

        On the class, ``await AsyncDbSessionFactory.dispose()`` also forgets the process
        default, so ``global_init()`` may be called again with another URL. Call it from
        the event loop the connections were opened in (the app's shutdown hook).
        """
        for binding in self._detach():
            await binding.engine.dispose()
            logger.debug("dbsession: async engine disposed for %s", mask_url(binding.engine.url))

    async_session_scope = DefaultOrSelf(_async_session_scope)
    run_in_transaction = DefaultOrSelf(_run_in_transaction)
    create_session = DefaultOrSelf(_create_session)
    get_engine = DefaultOrSelf(_get_engine)
    create_all = DefaultOrSelf(_create_all)
    dispose = DefaultOrSelf(_dispose, no_default=lambda: _nothing())


async def _nothing() -> None:
    """What ``await AsyncDbSessionFactory.dispose()`` does when there is no default."""


def _sync_engine(engine: AsyncEngine) -> Engine:
    return engine.sync_engine


def _require_greenlet() -> None:
    try:
        importlib.import_module("greenlet")
    except ImportError:
        raise MissingDriverError(
            "SQLAlchemy's asyncio support needs the 'greenlet' package, which is not "
            "installed. Install it: pip install 'dbsession[async]'."
        ) from None


def async_session_scope(
    *,
    nested: bool = False,
    readonly: bool = False,
    isolation_level: str | None = None,
    timeout: float | None = None,
    replica: bool | None = None,
) -> AbstractAsyncContextManager[AsyncSession]:
    """Open a unit of work on the process default async factory.

    See AsyncDbSessionFactory.async_session_scope.
    """
    return AsyncDbSessionFactory.default()._async_session_scope(
        nested=nested,
        readonly=readonly,
        isolation_level=isolation_level,
        timeout=timeout,
        replica=replica,
    )


#: ``await async_run_in_transaction(fn, *args, attempts=5, ...)`` on the process default
#: async factory, looked up at each call; see AsyncDbSessionFactory.run_in_transaction.
async_run_in_transaction = AsyncDbSessionFactory.run_in_transaction


def current_async_session() -> AsyncSession:
    """Return the AsyncSession of the innermost active scope of this asyncio task.

    The async twin of ``dbsession.current_session()`` (use ``dbsession.on_commit``
    in either kind of scope). Raises NoActiveScopeError outside any scope, and
    inside a sync scope.
    """
    return session_of_scope(AsyncSession, "current_async_session()", "dbsession.current_session()")


def create_async_session() -> AsyncSession:
    """Return a new AsyncSession of the process default async factory; the caller manages it."""
    return AsyncDbSessionFactory.default()._create_session()
