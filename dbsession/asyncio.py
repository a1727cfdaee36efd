"""The async twins of dbsession's factory and unit of work, for asyncio applications.

Names follow one rule: a module function is the sync name with an ``async_`` prefix
(``async_session_scope``, ``async_run_in_transaction``, ``async_transactional``,
``async_create_session``, ``async_current_session``, ``async_default_factory``), so it
can be imported beside its twin; a method of ``AsyncDbSessionFactory`` has the same
name as on ``DbSessionFactory`` (``factory.session_scope()``), since the class already
says it is async. ``dbsession.on_commit`` serves both sides.

``async with async_session_scope() as session:`` gives a real SQLAlchemy
``AsyncSession``; leaving the block commits, any exception (a cancelled task or an
``asyncio.timeout`` included) rolls back, and the connection is back in the pool
before the exception leaves the block.

The URL is resolved as on the sync side (argument > ``DATABASE_URL`` > the embedded
SQLite file); a URL that names no driver gets the async one of its backend
(``sqlite+aiosqlite``, ``postgresql+psycopg`` in its async mode, ``mysql+aiomysql``).
The engine gets the same opinions as the sync one. Needs
``pip install 'sqlalchemy-dbsession[async]'`` (and ``sqlalchemy-dbsession[postgres]`` for
PostgreSQL). ``import dbsession`` never imports this module.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar, overload

from sqlalchemy import MetaData
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from ._async_scope import AsyncSavepoint, AsyncUnitOfWork
from ._base import Base
from ._binding import Binding
from ._config import Settings, mask_url
from ._context import session_of_scope
from ._engine import build_engine
from ._errors import MissingDriverError
from ._lifecycle import LazyFactory, Registry, decorate, run_options, scope_session_class
from ._retry import RetryPolicy, run_with_retries_async, unit_name
from ._scope import ScopeSession

__all__ = [
    "AsyncDbSessionFactory",
    "async_create_session",
    "async_current_session",
    "async_default_factory",
    "async_run_in_transaction",
    "async_session_scope",
    "async_transactional",
]

logger: logging.Logger = logging.getLogger("dbsession")

P = ParamSpec("P")
T = TypeVar("T")
AsyncBinding = Binding[AsyncEngine, async_sessionmaker[AsyncSession]]
AsyncUnit = Callable[Concatenate[AsyncSession, P], Awaitable[T]]


class AsyncDbSessionFactory(LazyFactory[AsyncBinding]):
    """Owns one AsyncEngine and its async_sessionmakers for one database URL.

    The async twin of :class:`dbsession.DbSessionFactory`, with the same method names:
    ``async with factory.session_scope() as session``. The process default is
    configured with :meth:`global_init` and used by ``async_session_scope()`` and the
    other module functions. The engine is built on first use, exactly once even when
    many tasks (or threads) race for it.

    Raises ConfigurationError subclasses when the URL or options cannot work,
    MissingDriverError naming ``pip install 'sqlalchemy-dbsession[async]'`` when an async driver
    or greenlet is missing.
    """

    _asyncio: ClassVar[bool] = True
    _session_base: ClassVar[type[Any]] = AsyncSession
    registry: ClassVar[Registry[AsyncDbSessionFactory]] = Registry("AsyncDbSessionFactory")

    @classmethod
    async def global_dispose(cls, *, allow_lazy: bool = False) -> None:
        """Dispose the process default async factory (if any) and forget it; see
        ``DbSessionFactory.global_dispose``. Call it from the event loop the connections
        were opened in (the app's shutdown hook)."""
        factory = cls.registry.take(allow_lazy=allow_lazy)
        if factory is not None:
            await factory.dispose()

    @property
    def engine(self) -> AsyncEngine:
        """The AsyncEngine, built on first access."""
        return self._build().engine

    @property
    def replica_engine(self) -> AsyncEngine | None:
        """The replica's AsyncEngine (built on first access), or None without a replica_url."""
        return None if self._settings.replica_url is None else self._build(replica=True).engine

    def _make(self, settings: Settings) -> AsyncBinding:
        _require_greenlet()
        engine, make_twin = build_engine(settings, create_async_engine, _sync_engine)
        return Binding(
            engine,
            engine.sync_engine,
            async_sessionmaker,
            expire_on_commit=settings.expire_on_commit,
            session_options=_session_options(self._session_class),
            make_twin=make_twin,
        )

    def session_scope(
        self,
        *,
        independent: bool = False,
        readonly: bool = False,
        isolation_level: str | None = None,
        timeout: float | None = None,
        replica: bool | None = None,
    ) -> AbstractAsyncContextManager[AsyncSession]:
        """Open a unit of work: an AsyncSession committed on success, rolled back on error.

        ``async with factory.session_scope() as session: ...``. Any exception,
        ``asyncio.CancelledError`` and timeouts included, rolls back and is re-raised
        unchanged once the session is closed and its connection back in the pool;
        ``on_commit`` hooks run after a successful commit. Inside an open scope of this
        factory in the same task it joins that scope as a SAVEPOINT; ``independent``,
        ``readonly``, ``isolation_level``, ``timeout`` and ``replica`` mean what they mean for
        ``DbSessionFactory.session_scope``, and it raises what that raises.
        """
        return self._open_scope(
            AsyncUnitOfWork,
            AsyncSavepoint,
            independent=independent,
            readonly=readonly,
            isolation_level=isolation_level,
            timeout=timeout,
            replica=replica,
        )

    @overload
    async def run_in_transaction(
        self, fn: AsyncUnit[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T: ...
    @overload
    async def run_in_transaction(  # type: ignore[overload-cannot-match]
        self,
        fn: Callable[Concatenate[AsyncSession, ...], Awaitable[T]],
        /,
        *args: Any,
        retry: RetryPolicy,
        readonly: bool = False,
        isolation_level: str | None = None,
        **kwargs: Any,
    ) -> T: ...
    @overload
    async def run_in_transaction(  # type: ignore[overload-cannot-match]
        self,
        fn: Callable[Concatenate[AsyncSession, ...], Awaitable[T]],
        /,
        *args: Any,
        retry: RetryPolicy | None = None,
        readonly: bool,
        isolation_level: str | None = None,
        **kwargs: Any,
    ) -> T: ...
    @overload
    async def run_in_transaction(  # type: ignore[overload-cannot-match]
        self,
        fn: Callable[Concatenate[AsyncSession, ...], Awaitable[T]],
        /,
        *args: Any,
        retry: RetryPolicy | None = None,
        readonly: bool = False,
        isolation_level: str,
        **kwargs: Any,
    ) -> T: ...
    async def run_in_transaction(
        self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any
    ) -> T:
        """Run ``await fn(session, *args, **kwargs)`` in a scope; retry it whole on a
        transient failure.

        The async twin of ``DbSessionFactory.run_in_transaction``: the same transient
        errors, the same reserved keywords (``retry``, ``readonly``,
        ``isolation_level``), the same backoff (awaited with ``asyncio.sleep``, so
        other tasks run meanwhile). Raises what it raises; cancellation propagates.
        """
        options = run_options(kwargs)
        return await self._run(
            lambda session: fn(session, *args, **kwargs), name=unit_name(fn), **options
        )

    async def _run(
        self,
        unit: Callable[[AsyncSession], Awaitable[T]],
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        readonly: bool = False,
        isolation_level: str | None = None,
    ) -> T:
        return await run_with_retries_async(
            lambda: self.session_scope(readonly=readonly, isolation_level=isolation_level),
            unit,
            policy=self._retry_policy(retry),
            dialect_name=self._settings.url.get_backend_name(),
            name=name,
        )

    @overload
    def transactional(self, fn: AsyncUnit[P, T], /) -> Callable[P, Awaitable[T]]: ...
    @overload
    def transactional(
        self,
        /,
        *,
        retry: RetryPolicy | None = None,
        readonly: bool = False,
        isolation_level: str | None = None,
    ) -> Callable[[AsyncUnit[P, T]], Callable[P, Awaitable[T]]]: ...
    def transactional(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        retry: RetryPolicy | None = None,
        readonly: bool = False,
        isolation_level: str | None = None,
    ) -> Any:
        """The async twin of ``DbSessionFactory.transactional``: ``async def fn(session,
        ...)`` becomes ``await fn(...)``, run by ``run_in_transaction``; bare or with
        options, on functions and methods."""
        options = {"retry": retry, "readonly": readonly, "isolation_level": isolation_level}
        return decorate(fn, self._run, options)

    def create_session(self) -> AsyncSession:
        """Return a new AsyncSession that the caller commits, rolls back and closes itself."""
        return self._build().maker()()

    async def create_all(self, metadata: MetaData | None = None) -> None:
        """Create the missing tables of ``metadata`` (default: ``dbsession.Base.metadata``).

        A quick-start convenience; an app with migrations runs Alembic instead.
        """
        async with self._build().engine.begin() as connection:
            await connection.run_sync((metadata or Base.metadata).create_all)

    async def dispose(self) -> None:
        """Close the pool's connections; the next use builds a new engine. Call it from
        the event loop the connections were opened in."""
        for binding in self._detach():
            for engine in binding.engines():
                await engine.dispose()
            logger.debug("dbsession: async engine disposed for %s", mask_url(binding.engine.url))


def _session_options(session_class: type[AsyncSession] | None) -> dict[str, Any]:
    """The async sessionmakers' classes: the app's AsyncSession (``sqlmodel``'s ...) over
    its sync Session class combined with dbsession's ScopeSession."""
    if session_class is None:
        return {"sync_session_class": ScopeSession}
    sync = scope_session_class(getattr(session_class, "sync_session_class", None))
    return {"class_": session_class, "sync_session_class": sync}


def _sync_engine(engine: AsyncEngine) -> Engine:
    return engine.sync_engine


def _require_greenlet() -> None:
    try:
        importlib.import_module("greenlet")
    except ImportError:
        raise MissingDriverError(
            "SQLAlchemy's asyncio support needs the 'greenlet' package, which is not "
            "installed. Install it: pip install 'sqlalchemy-dbsession[async]'."
        ) from None


def async_default_factory() -> AsyncDbSessionFactory:
    """The process default async factory (see ``dbsession.default_factory``). Raises
    NotInitializedError after ``AsyncDbSessionFactory.global_dispose()``."""
    return AsyncDbSessionFactory.registry.get(AsyncDbSessionFactory._lazy_default)


def async_session_scope(
    *,
    independent: bool = False,
    readonly: bool = False,
    isolation_level: str | None = None,
    timeout: float | None = None,
    replica: bool | None = None,
) -> AbstractAsyncContextManager[AsyncSession]:
    """Open a unit of work on the process default async factory; see
    ``AsyncDbSessionFactory.session_scope``."""
    return async_default_factory().session_scope(
        independent=independent,
        readonly=readonly,
        isolation_level=isolation_level,
        timeout=timeout,
        replica=replica,
    )


@overload
async def async_run_in_transaction(
    fn: AsyncUnit[P, T], /, *args: P.args, **kwargs: P.kwargs
) -> T: ...
@overload
async def async_run_in_transaction(  # type: ignore[overload-cannot-match]
    fn: Callable[Concatenate[AsyncSession, ...], Awaitable[T]],
    /,
    *args: Any,
    retry: RetryPolicy,
    readonly: bool = False,
    isolation_level: str | None = None,
    **kwargs: Any,
) -> T: ...
@overload
async def async_run_in_transaction(  # type: ignore[overload-cannot-match]
    fn: Callable[Concatenate[AsyncSession, ...], Awaitable[T]],
    /,
    *args: Any,
    retry: RetryPolicy | None = None,
    readonly: bool,
    isolation_level: str | None = None,
    **kwargs: Any,
) -> T: ...
@overload
async def async_run_in_transaction(  # type: ignore[overload-cannot-match]
    fn: Callable[Concatenate[AsyncSession, ...], Awaitable[T]],
    /,
    *args: Any,
    retry: RetryPolicy | None = None,
    readonly: bool = False,
    isolation_level: str,
    **kwargs: Any,
) -> T: ...
async def async_run_in_transaction(
    fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any
) -> T:
    """``await fn(session, *args, **kwargs)`` in a unit of work on the process default async
    factory, retried whole on transient failures; see
    ``AsyncDbSessionFactory.run_in_transaction``."""
    return await async_default_factory().run_in_transaction(fn, *args, **kwargs)


@overload
def async_transactional(fn: AsyncUnit[P, T], /) -> Callable[P, Awaitable[T]]: ...
@overload
def async_transactional(
    *,
    retry: RetryPolicy | None = None,
    readonly: bool = False,
    isolation_level: str | None = None,
) -> Callable[[AsyncUnit[P, T]], Callable[P, Awaitable[T]]]: ...
def async_transactional(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    retry: RetryPolicy | None = None,
    readonly: bool = False,
    isolation_level: str | None = None,
) -> Any:
    """``@async_transactional`` / ``@async_transactional(...)`` on the process default async
    factory, looked up at each call; see ``AsyncDbSessionFactory.transactional``."""
    options = {"retry": retry, "readonly": readonly, "isolation_level": isolation_level}
    return decorate(fn, lambda unit, **kw: async_default_factory()._run(unit, **kw), options)


def async_current_session() -> AsyncSession:
    """Return the AsyncSession of the innermost scope open in this asyncio task.

    The async twin of ``dbsession.current_session()`` (use ``dbsession.on_commit`` in
    either kind of scope). Raises NoActiveScopeError outside any scope (a child task is
    outside its parent's), and inside a sync scope.
    """
    return session_of_scope(AsyncSession, "async_current_session()", "dbsession.current_session()")


def async_create_session() -> AsyncSession:
    """Return a new AsyncSession of the process default async factory; the caller manages it."""
    return async_default_factory().create_session()


_RENAMED = {
    "current_async_session": "async_current_session",
    "create_async_session": "async_create_session",
}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        warnings.warn(
            f"dbsession.asyncio.{name} is deprecated; use {_RENAMED[name]}",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
