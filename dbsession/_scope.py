"""The unit of work: one session, committed on success, rolled back on any exception.

A scope is pushed on the stack of active scopes (``_context``) while it is open,
so ``current_session()`` and ``on_commit()`` find it; a savepoint scope joins
an outer one's session and transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

from sqlalchemy.orm import Session

from ._context import Frame, entered, run_hooks
from ._errors import ScopeError

logger = logging.getLogger("dbsession")


@contextmanager
def unit_of_work(
    make_session: Callable[[], Session],
    *,
    owner: object = None,
    readonly: bool = False,
    isolation_level: str | None = None,
) -> Iterator[Session]:
    """Yield a new session; commit when the block ends, roll back on any exception, always close.

    Any ``BaseException`` (``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit``)
    rolls back too, and the original exception is re-raised unchanged. If the
    commit itself fails, the transaction is rolled back and the commit's error raised.
    A ``readonly`` scope flushes (so pending ORM changes raise ReadOnlyError instead
    of vanishing) and ends with a rollback.
    After a successful end, the scope's ``on_commit`` hooks run, once the session is closed.
    """
    session = make_session()
    frame = Frame(session, owner, readonly, isolation_level)
    try:
        with entered(frame):
            yield session
            end_transaction(session, readonly)
    except BaseException:
        rollback_quietly(session)
        raise
    finally:
        session.close()
    run_hooks(frame.hooks)


def savepoint_frame(outer: Frame, *, readonly: bool, isolation_level: str | None) -> Frame:
    """The frame of a savepoint joined to ``outer`` (shared by the sync and async scopes).

    Raises ScopeError if asked to be read-only or to use an isolation level the
    outer transaction does not already have.
    """
    if readonly and not outer.readonly:
        raise ScopeError(
            "session_scope(nested=True, readonly=True) inside a writing scope: a savepoint "
            "shares the outer transaction and cannot make it read-only. Open an "
            "independent scope with session_scope(readonly=True) instead."
        )
    if isolation_level is not None and isolation_level != outer.isolation_level:
        raise ScopeError(
            f"session_scope(nested=True, isolation_level={isolation_level!r}) inside a scope "
            f"with isolation level {outer.isolation_level or 'the default'}: a savepoint "
            "shares the outer transaction and cannot change its isolation level. Give the "
            "level to the outer scope, or open an independent scope."
        )
    return Frame(outer.session, outer.owner, outer.readonly, outer.isolation_level, parent=outer)


@contextmanager
def savepoint(frame: Frame) -> Iterator[Session]:
    """Yield the session of ``frame`` (made by ``savepoint_frame``) inside a SAVEPOINT.

    An exception rolls back to the savepoint only (and the hooks registered since)
    and is re-raised; on success the savepoint is released and its hooks wait for
    the outer commit.
    """
    session = cast(Session, frame.session)
    with entered(frame), session.begin_nested():
        yield session
    frame.hand_up()


def end_transaction(session: Session, readonly: bool) -> None:
    """End a scope's transaction that raised nothing: commit it, or for a read-only one
    flush (so pending ORM changes raise ReadOnlyError instead of vanishing) and roll back."""
    if readonly:
        session.flush()
        session.rollback()
    else:
        session.commit()


def rollback_quietly(session: Session) -> None:
    """Roll back without letting a failing rollback hide the exception that caused it."""
    try:
        session.rollback()
    except Exception:
        logger.warning("dbsession: rollback failed after an error in the scope", exc_info=True)
