"""FastAPI: a request-scoped unit of work as a dependency
(``pip install 'sqlalchemy-dbsession[fastapi]'``).

``session: DbSession`` in a path operation gives a real SQLAlchemy Session from
``session_scope()``. When the path operation function returns, the unit of work is
committed, and only then is the response sent; when it raises (an ``HTTPException``
after writes included), FastAPI re-raises the exception into the dependency, so the
unit of work is rolled back before the error response is built. A commit that fails
becomes an error response (FastAPI's exception handlers, else 500), never a success.

``session: ReadOnlyDbSession`` (and ``AsyncReadOnlyDbSession``) is a read-only unit
of work for path operations that only read: it never takes a write lock, so on
SQLite a GET does not queue behind writers, and a write in it raises ReadOnlyError.

``session: AsyncDbSession`` is the same for ``async def`` path operations: an
``AsyncSession`` from ``dbsession.asyncio.async_session_scope()``. It needs
``pip install 'sqlalchemy-dbsession[async]'`` only when a request uses it; importing this
module never imports ``dbsession.asyncio``, ``sqlalchemy.ext.asyncio`` (which needs
greenlet on SQLAlchemy 2.1) or an async driver: ``AsyncDbSession`` is built on first
access, so ``pip install 'sqlalchemy-dbsession[fastapi]'`` alone is enough for ``DbSession``.

The handler runs in another context copy than the dependency (and a sync handler in a
worker thread), so the dependency *lends* its scope to the request: inside the handler,
``current_session()`` (``async_current_session()``), ``on_commit()`` and nested
``session_scope()`` calls see the request's unit of work. The sync dependency is an
``async def`` that opens the sync scope in the thread pool and ends it in a worker thread
that does not queue for the pool's limiter (as FastAPI ends its own sync dependencies), so
the database I/O never blocks the event loop, the lent scope lives in the request's
context, and a request never holds its connection while it waits for a thread.

That ordering comes from ``Depends(..., scope="function")`` (FastAPI >= 0.121).
With FastAPI's default scope (``"request"``) the exit code of a dependency with
``yield`` runs after the response was sent, so a client could get ``201`` for a
commit that then failed. See docs/web.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import anyio.to_thread
from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from .. import observability
from .._context import Frame, innermost, lend
from .._errors import ScopeError
from .._factory import DbSessionFactory, session_scope

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from ..asyncio import AsyncDbSessionFactory

__all__ = [
    "AsyncDbSession",
    "AsyncReadOnlyDbSession",
    "DbSession",
    "ReadOnlyDbSession",
    "async_session_dependency",
    "get_async_readonly_session",
    "get_async_session",
    "get_readonly_session",
    "get_session",
    "session_dependency",
]


def session_dependency(
    factory: DbSessionFactory | None = None, *, readonly: bool = False
) -> Callable[[Request], AsyncIterator[Session]]:
    """Return a FastAPI dependency that yields a session inside ``factory.session_scope()``.

    Without ``factory`` it uses the process default (``DbSessionFactory.global_init()``,
    looked up on each request, so the app may initialise it in its lifespan). Use it
    as ``Annotated[Session, Depends(session_dependency(reports), scope="function")]``.
    ``readonly=True`` gives ``session_scope(readonly=True)``: no write lock is taken
    (on SQLite the request does not queue behind writers) and a write raises
    ReadOnlyError. Opening the scope raises DatabaseUnreachableError when no
    connection can be had.
    """
    open_scope: Callable[..., AbstractContextManager[Session]] = (
        session_scope if factory is None else factory.session_scope
    )

    async def get_session(request: Request) -> AsyncIterator[Session]:
        """Yield one unit of work: committed when the endpoint returns, rolled back if it raises."""
        scope = open_scope(readonly=readonly)
        session, frame, observation = await run_in_threadpool(
            _enter, scope, request.scope.get("endpoint")
        )
        lend(frame)
        # The handler's statements, pool waits and checkouts are the request's unit of work
        # (PoolExhaustedError names its endpoint as the holder).
        lent = observability._lend(observation)
        try:
            try:
                yield session
            except BaseException as error:
                await _end(scope, error)
                raise
            await _end(scope, None)
        finally:
            observability._unlend(lent)

    return get_session


async def _end(scope: AbstractContextManager[Session], error: BaseException | None) -> None:
    """End ``scope`` (commit, or roll back after ``error``) in a worker thread that does
    not queue for the thread pool's limiter, shielded from cancellation.

    The handler's connection is still checked out here. Waiting for one of the default
    limiter's 40 threads would hold it while those threads may all be other requests'
    handlers blocked on the pool, waiting for this very connection: every request then
    waits until a checkout times out (PoolExhaustedError). FastAPI ends its own sync
    dependencies the same way (``contextmanager_in_threadpool``). A cancelled request
    must still return its connection: recent FastAPI versions shield a dependency's exit
    themselves, this does not rely on it.
    """
    exit_args = (None, None, None) if error is None else (type(error), error, error.__traceback__)
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(scope.__exit__, *exit_args, limiter=anyio.CapacityLimiter(1))


def _enter(
    scope: AbstractContextManager[Session], endpoint: object
) -> tuple[Session, Frame, observability.Observation | None]:
    """Enter ``scope`` (in a worker thread) and return its session, its frame and its
    observation; the unit of work is reported at ``endpoint`` (observability)."""
    session = scope.__enter__()
    observability._name_current(endpoint)
    frame = innermost()
    if frame is None or frame.session is not session:  # pragma: no cover - a dbsession bug
        scope.__exit__(None, None, None)
        raise ScopeError("dbsession: the request's scope is not visible where it was opened.")
    return session, frame, observability._current()


#: The dependency on the process default factory.
get_session: Callable[[Request], AsyncIterator[Session]] = session_dependency()

#: ``session: DbSession`` in a path operation: one unit of work on the process default
#: factory, committed before the response is sent.
DbSession = Annotated[Session, Depends(get_session, scope="function")]

#: The read-only dependency on the process default factory.
get_readonly_session: Callable[[Request], AsyncIterator[Session]] = session_dependency(
    readonly=True
)

#: ``session: ReadOnlyDbSession`` in a path operation that only reads (a GET): a read-only
#: unit of work on the process default factory; it takes no write lock.
ReadOnlyDbSession = Annotated[Session, Depends(get_readonly_session, scope="function")]


def async_session_dependency(
    factory: AsyncDbSessionFactory | None = None, *, readonly: bool = False
) -> Callable[[Request], AsyncIterator[AsyncSession]]:
    """Return a FastAPI dependency that yields an AsyncSession inside one async unit of work.

    Without ``factory`` it uses the process default ``AsyncDbSessionFactory``, looked
    up on each request (initialise it in the app's lifespan). Use it as
    ``Annotated[AsyncSession, Depends(async_session_dependency(f), scope="function")]``.
    ``readonly=True`` gives a read-only unit of work, as for ``session_dependency``.
    The first request raises ModuleNotFoundError when dbsession's async support is
    missing, and MissingDriverError (``pip install 'sqlalchemy-dbsession[async]'``) when its
    drivers are; DatabaseUnreachableError when no connection can be had.
    """

    async def get_async_session(request: Request) -> AsyncIterator[AsyncSession]:
        """Yield one async unit of work: committed when the endpoint returns, else rolled back."""
        from ..asyncio import async_default_factory  # the async extra, only when used

        owner = factory or async_default_factory()
        async with owner.session_scope(readonly=readonly) as session:
            observability._name_current(request.scope.get("endpoint"))
            frame = innermost()
            if frame is not None and frame.session is session:
                lend(frame)  # the handler runs outside this generator's frame
            yield session

    return get_async_session


#: The async dependency on the process default AsyncDbSessionFactory.
get_async_session: Callable[[Request], AsyncIterator[AsyncSession]] = async_session_dependency()

#: The read-only async dependency on the process default AsyncDbSessionFactory.
get_async_readonly_session: Callable[[Request], AsyncIterator[AsyncSession]] = (
    async_session_dependency(readonly=True)
)

if TYPE_CHECKING:
    #: ``session: AsyncDbSession`` in an ``async def`` path operation: one async unit of
    #: work on the process default async factory, committed before the response is sent.
    AsyncDbSession = Annotated[AsyncSession, Depends(get_async_session, scope="function")]
    #: ``session: AsyncReadOnlyDbSession`` in an ``async def`` path operation that only
    #: reads: a read-only async unit of work on the process default async factory.
    AsyncReadOnlyDbSession = Annotated[
        AsyncSession, Depends(get_async_readonly_session, scope="function")
    ]

_LAZY = {
    "AsyncDbSession": "get_async_session",
    "AsyncReadOnlyDbSession": "get_async_readonly_session",
}


def __getattr__(name: str) -> Any:
    """Build ``AsyncDbSession`` / ``AsyncReadOnlyDbSession`` on first access: only then is
    sqlalchemy.ext.asyncio imported (``sqlalchemy-dbsession[fastapi]`` works without
    ``[async]``)."""
    if name in _LAZY:
        from sqlalchemy.ext.asyncio import AsyncSession

        alias = Annotated[AsyncSession, Depends(globals()[_LAZY[name]], scope="function")]
        globals()[name] = alias
        return alias
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
