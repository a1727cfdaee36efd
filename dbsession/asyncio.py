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
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import ClassVar

from sqlalchemy import MetaData
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from ._async_scope import async_unit_of_work
from ._base import Base
from ._config import Settings
from ._engine import build_engine, write_options
from ._errors import MissingDriverError
from ._lifecycle import DefaultOrSelf, LazyFactory

__all__ = [
    "AsyncDbSessionFactory",
    "async_session_scope",
    "create_async_session",
]

logger = logging.getLogger("dbsession")


@dataclass(frozen=True)
class _AsyncBuilt:
    engine: AsyncEngine
    writer: async_sessionmaker[AsyncSession]


class AsyncDbSessionFactory(LazyFactory[_AsyncBuilt]):
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

    def _make(self, settings: Settings) -> _AsyncBuilt:
        _require_greenlet()
        engine = build_engine(settings, create_async_engine, _sync_engine)
        writer = async_sessionmaker(
            bind=engine.execution_options(**write_options(settings.url)),
            expire_on_commit=settings.expire_on_commit,
        )
        return _AsyncBuilt(engine, writer)

    def _async_session_scope(self) -> AbstractAsyncContextManager[AsyncSession]:
        """Open a unit of work: a fresh AsyncSession committed on success, rolled back on error.

        ``async with AsyncDbSessionFactory.async_session_scope() as session: ...``. Any
        exception, ``asyncio.CancelledError`` and timeouts included, rolls back and is
        re-raised unchanged once the session is closed and its connection back in the
        pool. Raises DatabaseUnreachableError when no connection can be opened.
        """
        return async_unit_of_work(self._build().writer)

    def _create_session(self) -> AsyncSession:
        """Return a new AsyncSession that the caller commits, rolls back and closes itself."""
        return self._build().writer()

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
        built = self._detach()
        if built is not None:
            await built.engine.dispose()
            logger.debug("dbsession: async engine disposed for %s", self._settings.describe())

    async_session_scope = DefaultOrSelf(_async_session_scope)
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


def async_session_scope() -> AbstractAsyncContextManager[AsyncSession]:
    """Open a unit of work on the process default async factory.

    See AsyncDbSessionFactory.async_session_scope.
    """
    return AsyncDbSessionFactory.default()._async_session_scope()


def create_async_session() -> AsyncSession:
    """Return a new AsyncSession of the process default async factory; the caller manages it."""
    return AsyncDbSessionFactory.default()._create_session()
