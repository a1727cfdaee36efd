"""FastAPI: a request-scoped unit of work as a dependency (``pip install 'dbsession[fastapi]'``).

``session: DbSession`` in a path operation gives a real SQLAlchemy Session from
``session_scope()``. When the path operation function returns, the unit of work is
committed, and only then is the response sent; when it raises (an ``HTTPException``
after writes included), FastAPI re-raises the exception into the dependency, so the
unit of work is rolled back before the error response is built. A commit that fails
becomes an error response (FastAPI's exception handlers, else 500), never a success.

``session: AsyncDbSession`` is the same for ``async def`` path operations: an
``AsyncSession`` from ``dbsession.asyncio.async_session_scope()``. It needs
``pip install 'dbsession[async]'`` only when a request uses it; importing this
module never imports ``dbsession.asyncio``, ``sqlalchemy.ext.asyncio`` (which needs
greenlet on SQLAlchemy 2.1) or an async driver: ``AsyncDbSession`` is built on first
access, so ``pip install 'dbsession[fastapi]'`` alone is enough for ``DbSession``.

That ordering comes from ``Depends(..., scope="function")`` (FastAPI >= 0.121).
With FastAPI's default scope (``"request"``) the exit code of a dependency with
``yield`` runs after the response was sent, so a client could get ``201`` for a
commit that then failed. See docs/web.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends
from sqlalchemy.orm import Session

from .._factory import DbSessionFactory, session_scope

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from ..asyncio import AsyncDbSessionFactory

__all__ = [
    "AsyncDbSession",
    "DbSession",
    "async_session_dependency",
    "get_async_session",
    "get_session",
    "session_dependency",
]


def session_dependency(
    factory: DbSessionFactory | None = None,
) -> Callable[[], Iterator[Session]]:
    """Return a FastAPI dependency that yields a session inside ``factory.session_scope()``.

    Without ``factory`` it uses the process default (``DbSessionFactory.global_init()``,
    looked up on each request, so the app may initialise it in its lifespan). Use it
    as ``Annotated[Session, Depends(session_dependency(reports), scope="function")]``.
    Opening the scope raises DatabaseUnreachableError when no connection can be had.
    """
    open_scope: Callable[[], AbstractContextManager[Session]] = (
        session_scope if factory is None else factory.session_scope
    )

    def get_session() -> Iterator[Session]:
        """Yield one unit of work: committed when the endpoint returns, rolled back if it raises."""
        with open_scope() as session:
            yield session

    return get_session


#: The dependency on the process default factory.
get_session: Callable[[], Iterator[Session]] = session_dependency()

#: ``session: DbSession`` in a path operation: one unit of work on the process default
#: factory, committed before the response is sent.
DbSession = Annotated[Session, Depends(get_session, scope="function")]


def async_session_dependency(
    factory: AsyncDbSessionFactory | None = None,
) -> Callable[[], AsyncIterator[AsyncSession]]:
    """Return a FastAPI dependency that yields an AsyncSession inside one async unit of work.

    Without ``factory`` it uses the process default ``AsyncDbSessionFactory``, looked
    up on each request (initialise it in the app's lifespan). Use it as
    ``Annotated[AsyncSession, Depends(async_session_dependency(f), scope="function")]``.
    The first request raises ModuleNotFoundError when dbsession's async support is
    missing, and MissingDriverError (``pip install 'dbsession[async]'``) when its
    drivers are; DatabaseUnreachableError when no connection can be had.
    """

    async def get_async_session() -> AsyncIterator[AsyncSession]:
        """Yield one async unit of work: committed when the endpoint returns, else rolled back."""
        from ..asyncio import AsyncDbSessionFactory  # the async extra, only when used

        async with (factory or AsyncDbSessionFactory).async_session_scope() as session:
            yield session

    return get_async_session


#: The async dependency on the process default AsyncDbSessionFactory.
get_async_session: Callable[[], AsyncIterator[AsyncSession]] = async_session_dependency()

if TYPE_CHECKING:
    #: ``session: AsyncDbSession`` in an ``async def`` path operation: one async unit of
    #: work on the process default async factory, committed before the response is sent.
    AsyncDbSession = Annotated[AsyncSession, Depends(get_async_session, scope="function")]


def __getattr__(name: str) -> Any:
    """Build ``AsyncDbSession`` on first access: only then is sqlalchemy.ext.asyncio imported."""
    if name == "AsyncDbSession":
        from sqlalchemy.ext.asyncio import AsyncSession

        alias = Annotated[AsyncSession, Depends(get_async_session, scope="function")]
        globals()[name] = alias
        return alias
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
