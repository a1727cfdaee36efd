"""The async unit of work: one AsyncSession, committed on success, rolled back on any
exception (task cancellation and timeouts included), always closed.

The rollback itself is the sync side's policy (``rollback_quietly``), run through
``AsyncSession.run_sync``. Cleanup runs to completion even when the task is cancelled
(again) meanwhile, so the connection is back in the pool before the exception leaves
the scope.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, cast

from sqlalchemy.ext.asyncio import AsyncSession

from ._context import Frame, entered, run_hooks
from ._scope import end_transaction, rollback_quietly

logger = logging.getLogger("dbsession")


@asynccontextmanager
async def async_unit_of_work(
    make_session: Callable[[], AsyncSession],
    *,
    owner: object = None,
    readonly: bool = False,
    isolation_level: str | None = None,
) -> AsyncIterator[AsyncSession]:
    """Yield a new session; commit when the block ends, roll back on any exception, always close.

    Any ``BaseException`` (``asyncio.CancelledError`` from a cancelled task or an
    ``asyncio.timeout``, ``KeyboardInterrupt``, ``GeneratorExit``) rolls back too, and
    the original exception is re-raised unchanged. If the commit fails, the transaction
    is rolled back and the commit's error raised. A cancellation that arrives during
    the rollback or close is held until they finish, then raised. A ``readonly`` scope
    ends like the sync one (``end_transaction``). The scope is on the stack of active
    scopes while open (``on_commit``, ``current_async_session``); after a successful
    end its ``on_commit`` hooks run, once the session is closed.
    """
    session = make_session()
    frame = Frame(session, owner, readonly, isolation_level)
    try:
        with entered(frame):
            yield session
            await session.run_sync(end_transaction, readonly)
    except BaseException:
        await run_to_completion(_roll_back_and_close(session))
        raise
    await run_to_completion(session.close())
    run_hooks(frame.hooks)


@asynccontextmanager
async def async_savepoint(frame: Frame) -> AsyncIterator[AsyncSession]:
    """Yield the session of ``frame`` (made by ``savepoint_frame``) inside a SAVEPOINT.

    An exception rolls back to the savepoint only (and the hooks registered since) and
    is re-raised; on success the savepoint is released and its hooks wait for the
    outer commit.
    """
    session = cast(AsyncSession, frame.session)
    with entered(frame):
        async with session.begin_nested():
            yield session
    frame.hand_up()


async def _roll_back_and_close(session: AsyncSession) -> None:
    try:
        await session.run_sync(rollback_quietly)
    finally:
        await session.close()


async def run_to_completion(cleanup: Coroutine[Any, Any, None]) -> None:
    """Await ``cleanup`` in a task of its own that cancelling this task cannot interrupt.

    If this task is cancelled while waiting, wait on until ``cleanup`` is done and then
    raise that CancelledError: the cancellation is delayed, never lost. Otherwise
    ``cleanup``'s own exception, if any, is raised.
    """
    task = asyncio.ensure_future(cleanup)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait((task,))  # unlike shield(), returns only when task is done
        except asyncio.CancelledError as error:
            cancelled = error
    if cancelled is None:
        task.result()
        return
    if not task.cancelled() and task.exception() is not None:
        logger.warning(
            "dbsession: cleanup failed while the task was cancelled", exc_info=task.exception()
        )
    raise cancelled
