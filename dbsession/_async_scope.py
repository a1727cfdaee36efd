"""The async unit of work: one AsyncSession, committed on success, rolled back on any
exception (task cancellation and timeouts included), always closed.

Every decision is the sync side's (``_scope``), run through ``AsyncSession.run_sync``.
Cleanup runs to completion even when the task is cancelled (again) meanwhile, so the
connection is back in the pool before the exception leaves the scope, and the hooks
of a committed transaction run whatever arrives while the session closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import SessionTransaction

from ._context import Frame, entering_frame, pop, push
from ._scope import (
    UnitOfWorkBase,
    close_savepoint,
    commit_unit,
    open_savepoint,
    rollback_quietly,
    savepoint_frame,
)

logger: logging.Logger = logging.getLogger("dbsession")


class AsyncUnitOfWork(UnitOfWorkBase[AsyncSession]):
    """``async with AsyncUnitOfWork(maker, ...) as session``: the twin of ``UnitOfWork``.

    Any ``BaseException`` (``asyncio.CancelledError`` from a cancelled task or an
    ``asyncio.timeout``, ``KeyboardInterrupt``, ``GeneratorExit``) rolls back too, and
    is re-raised unchanged once the session is closed. A cancellation that arrives
    during the rollback or close is held until they finish, then raised.
    """

    __slots__ = ()

    async def __aenter__(self) -> AsyncSession:
        return self._open(entering_frame(1))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session: AsyncSession = self._frame.session  # type: ignore[assignment]
        error = exc
        try:
            # One task run to completion: a cancellation never leaves a commit half-known,
            # nor the connection out of the pool.
            await run_to_completion(_end(session, self._frame, exc))
        except BaseException as failure:
            error = failure
            raise
        finally:
            self._finish(session, error)


async def _end(session: AsyncSession, frame: Frame, exc: BaseException | None) -> None:
    """Commit (``exc`` None) or roll back the unit of work, roll back if the commit
    fails, and close the session whatever happens; raise what the commit raised.

    The scope is this task's while it runs: what the final flush and the COMMIT call
    (an ORM event that calls ``on_commit()``) is still inside it."""
    frame.claim(entering_frame(0))
    try:
        if exc is None:
            await session.run_sync(commit_unit, frame)
        else:
            await session.run_sync(rollback_quietly)
    except BaseException:
        await session.run_sync(rollback_quietly)
        raise
    finally:
        await _close_quietly(session)


class AsyncSavepoint:
    """``async with AsyncSavepoint(outer, ...) as session``: the twin of ``Savepoint``."""

    __slots__ = ("_frame", "_transaction")

    def __init__(self, outer: Frame, *, readonly: bool, isolation_level: str | None) -> None:
        self._frame = savepoint_frame(outer, readonly=readonly, isolation_level=isolation_level)

    async def __aenter__(self) -> AsyncSession:
        frame = self._frame
        frame.claim(entering_frame(1))
        session: AsyncSession = frame.session  # type: ignore[assignment]
        self._transaction = await session.run_sync(open_savepoint, frame)
        push(frame)
        return session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session: AsyncSession = self._frame.session  # type: ignore[assignment]
        try:
            await run_to_completion(_close(session, self._frame, self._transaction, exc))
        finally:
            pop(self._frame)


async def _close(
    session: AsyncSession, frame: Frame, transaction: SessionTransaction, exc: BaseException | None
) -> None:
    """Release or roll back the joined scope's SAVEPOINT, in a task that owns the scope
    while it runs (an ORM event of the closing flush may call ``on_commit()``)."""
    frame.claim(entering_frame(0))
    await session.run_sync(close_savepoint, frame, transaction, exc)


async def _close_quietly(session: AsyncSession) -> None:
    try:
        await session.close()
    except Exception:
        logger.warning("dbsession: closing the session failed", exc_info=True)


async def run_to_completion(cleanup: Coroutine[Any, Any, Any]) -> Any:
    """Await ``cleanup`` in a task of its own that cancelling this task cannot interrupt.

    If this task is cancelled while waiting, wait on until ``cleanup`` is done and then
    raise that CancelledError: the cancellation is delayed, never lost. Otherwise
    ``cleanup``'s own result is returned, or its exception raised.
    """
    task = asyncio.ensure_future(cleanup)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait((task,))  # unlike shield(), returns only when task is done
        except asyncio.CancelledError as error:
            cancelled = error
    if cancelled is None:
        return task.result()
    if not task.cancelled() and task.exception() is not None:
        logger.warning(
            "dbsession: cleanup failed while the task was cancelled", exc_info=task.exception()
        )
    raise cancelled
