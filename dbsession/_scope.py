"""The unit of work: one session, committed on success, rolled back on any exception.

``UnitOfWork`` is an outermost scope: a fresh session and transaction. ``Savepoint``
is a scope opened inside a visible scope of the same factory: it joins the outer
session inside a SAVEPOINT, so an exception rolls back its own work only. Both are
pushed on the stack of active scopes (``_context``) while open, so
``current_session()`` and ``on_commit()`` find them. The async twins in
``_async_scope`` reuse every decision made here (``savepoint_frame``,
``end_transaction``, ``rollback_quietly``, ``lost_transaction``).
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, Generic, TypeVar

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, SessionTransaction

from . import observability
from ._classify import transient_reason
from ._context import Frame, entering_frame, pop, push, run_hooks
from ._errors import ScopeError, TransactionAbortedError
from ._guard import guard, unguard

logger: logging.Logger = logging.getLogger("dbsession")

S = TypeVar("S")

#: ``session.info`` key: set by the database commit of the unit of work (``watch_commit``).
COMMITTED_KEY = "dbsession_committed"


class ScopeSession(Session):
    """The Session class of dbsession's sessionmakers: a plain SQLAlchemy Session that
    refuses writes while a read-only scope joined to a writing one is open."""

    #: What each commit of the session calls (a no-op); ``watch_commit`` sets it for the
    #: unit of work's own commit. Class-level, so no per-session event set-up is paid.
    _dbsession_on_commit: Callable[[], object] = staticmethod(tuple)


# Only C functions run from the commit to its record (see watch_commit); the partial
# because SQLAlchemy keeps a weak reference to a listener, which a methodcaller refuses.
event.listen(
    ScopeSession,
    "after_commit",
    functools.partial(operator.methodcaller("_dbsession_on_commit")),
)


def observe(frame: Frame) -> observability.Observation | None:
    """Start observing the unit of work of ``frame`` (None when nothing is observed)."""
    return observability.begin(frame.entered_by, frame.owner, frame.readonly, frame.isolation_level)


def observed_end(
    observation: observability.Observation | None, committed: bool, error: BaseException | None
) -> None:
    """Finish observing a unit of work (a no-op when it was not observed)."""
    if observation is not None:
        observability.end(observation, "committed" if committed else "rolled back", error)


class UnitOfWorkBase(Generic[S]):
    """What a unit of work keeps, sync (``UnitOfWork``) or async (``AsyncUnitOfWork``):
    how to make its session, and once it is open, its scope frame and observation."""

    __slots__ = (
        "_make_session",
        "_owner",
        "_readonly",
        "_isolation_level",
        "_frame",
        "_observation",
    )

    def __init__(
        self,
        make_session: Callable[[], S],
        *,
        owner: object = None,
        readonly: bool = False,
        isolation_level: str | None = None,
    ) -> None:
        self._make_session = make_session
        self._owner = owner
        self._readonly = readonly
        self._isolation_level = isolation_level

    def _open(self, entered_by: FrameType | None) -> S:
        """Make the session, push its frame (opened by ``entered_by``) and observe it."""
        session = self._make_session()
        frame = Frame(session, self._owner, self._readonly, self._isolation_level)
        frame.entered_by = entered_by
        self._frame = frame
        push(frame)
        self._observation = observe(frame)
        return session


class UnitOfWork(UnitOfWorkBase[Session]):
    """``with UnitOfWork(maker, ...) as session``: a new session; commit when the block
    ends, roll back on any exception, always close.

    Any ``BaseException`` (``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit``)
    rolls back too, and is re-raised unchanged. If the commit itself fails, the
    transaction is rolled back and the commit's error raised. A scope whose
    transaction was lost in a savepoint raises TransactionAbortedError instead of
    committing. After a commit, the ``on_commit`` hooks run once the session is
    closed, even if an interrupt arrives while it closes.
    """

    __slots__ = ()

    def __enter__(self) -> Session:
        return self._open(entering_frame(1))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        frame = self._frame
        session: Session = frame.session  # type: ignore[assignment]
        error = exc
        try:
            if exc is None:
                refuse_doomed(frame)
                end_transaction(session, frame.readonly)
            else:
                rollback_quietly(session)
        except BaseException as failure:
            error = failure
            rollback_quietly(session)
            raise
        finally:
            # Each step in a finally of its own: an interrupt in one still runs the next.
            try:
                pop(frame)
            finally:
                try:
                    close_quietly(session)
                finally:
                    try:
                        if was_committed(session):
                            run_hooks(frame.hooks, session)
                    finally:
                        try:
                            observed_end(self._observation, error is None, error)
                        finally:
                            pop(frame)  # again, if an interrupt cut the first one short


def savepoint_frame(outer: Frame, *, readonly: bool, isolation_level: str | None) -> Frame:
    """The frame of a scope joined to ``outer`` (shared by the sync and async scopes).

    A read-only scope inside a writing one is guarded (writes raise ReadOnlyError); a
    writing scope inside a read-only one stays read-only. Raises ScopeError when asked
    for an isolation level the outer transaction does not already have.
    """
    if isolation_level is not None and isolation_level != outer.isolation_level:
        raise ScopeError(
            f"session_scope(isolation_level={isolation_level!r}) inside a scope with "
            f"isolation level {outer.isolation_level or 'the default'}: a joined scope "
            "shares the outer transaction and cannot change its isolation level. Give the "
            "level to the outer scope, or open session_scope(independent=True)."
        )
    return Frame(
        outer.session,
        outer.owner,
        readonly or outer.readonly,
        outer.isolation_level,
        parent=outer,
    )


def guards(frame: Frame) -> bool:
    """True if ``frame`` is a read-only scope joined to a writing one (dbsession refuses
    its writes, because the database cannot)."""
    return frame.readonly and frame.parent is not None and not frame.parent.readonly


class Savepoint:
    """``with Savepoint(outer, ...) as session``: the outer scope's session inside a
    SAVEPOINT. An exception rolls back to the savepoint only (and drops the hooks
    registered since) and is re-raised; on success the savepoint is released and its
    hooks wait for the outer commit. An error that lost the whole transaction (a
    deadlock, a killed connection, a savepoint that cannot be rolled back) dooms the
    outer unit of work: it will refuse to commit."""

    __slots__ = ("_frame", "_transaction")

    def __init__(self, outer: Frame, *, readonly: bool, isolation_level: str | None) -> None:
        self._frame = savepoint_frame(outer, readonly=readonly, isolation_level=isolation_level)

    def __enter__(self) -> Session:
        frame = self._frame
        frame.entered_by = entering_frame(1)
        session: Session = frame.session  # type: ignore[assignment]
        self._transaction = open_savepoint(session, frame)
        push(frame)
        return session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            close_savepoint(self._frame.session, self._frame, self._transaction, exc)  # type: ignore[arg-type]
        finally:
            try:
                pop(self._frame)
            finally:
                pop(self._frame)  # again, if an interrupt cut the first one short


def open_savepoint(session: Session, frame: Frame) -> SessionTransaction:
    """Begin the SAVEPOINT of ``frame``; a guarded (read-only in writing) scope first
    flushes the outer scope's pending changes, which are not its own writes."""
    guarded = guards(frame)
    if guarded:
        session.flush()
    transaction = session.begin_nested()
    if guarded:
        guard(session, session.connection())
    return transaction


def close_savepoint(
    session: Session, frame: Frame, transaction: SessionTransaction, exc: BaseException | None
) -> None:
    """Release the SAVEPOINT of ``frame`` after a clean exit (its hooks go up to the
    parent), or roll it back after ``exc``; raise whatever the release raised."""
    try:
        if exc is None:
            try:
                session.flush()
                transaction.commit()
            except BaseException as error:
                roll_back_savepoint(frame, error, transaction.rollback)
                raise
            frame.hand_up()
        else:
            roll_back_savepoint(frame, exc, transaction.rollback)
    finally:
        if guards(frame):
            unguard(session)


def roll_back_savepoint(frame: Frame, error: BaseException, rollback: Callable[[], Any]) -> None:
    """Roll a savepoint back after ``error``; doom the unit of work if its transaction is lost."""
    try:
        rollback()
    except Exception:
        logger.warning("dbsession: rolling back a savepoint failed", exc_info=True)
        doom(frame, error)
        return
    if lost_transaction(error, frame.session):
        doom(frame, error)


def lost_transaction(error: BaseException, session: object) -> bool:
    """True if ``error`` inside a savepoint may have ended the whole transaction: a
    disconnect, or a transient error (MariaDB rolls back the whole transaction of a
    deadlock victim; a serialization failure asks for the whole unit to run again)."""
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    bind = session.get_bind() if isinstance(session, Session) else None
    dialect = bind.dialect.name if bind is not None else ""
    return transient_reason(error, dialect) is not None


def doom(frame: Frame, error: BaseException) -> None:
    """Mark the unit of work of ``frame`` as lost: its outermost scope will not commit."""
    root = frame.root
    if root.doomed is None:
        root.doomed = error


def refuse_doomed(frame: Frame) -> None:
    """Raise TransactionAbortedError (chaining the cause) if the unit of work was lost."""
    if frame.doomed is not None:
        raise TransactionAbortedError(
            "The unit of work cannot commit: its transaction was lost inside a joined "
            f"scope ({type(frame.doomed).__name__}: "
            f"{str(frame.doomed).splitlines()[0] if str(frame.doomed) else ''}), so "
            "committing now would save only part of it. It was rolled back; run the "
            "whole unit again (run_in_transaction does this for transient errors)."
        ) from frame.doomed


def end_transaction(session: Session, readonly: bool) -> None:
    """End a scope's transaction that raised nothing: commit it, or for a read-only one
    flush (so pending ORM changes raise ReadOnlyError instead of vanishing) and roll back,
    keeping the loaded objects readable as a commit does (unless expire_on_commit).

    SAVEPOINTs the block left open (``session.begin_nested()``) are released first:
    SQLAlchemy reports each release as a commit, which must not count as the unit's.
    """
    while session.in_nested_transaction():
        session.get_nested_transaction().commit()  # type: ignore[union-attr]
    watch_commit(session)
    if readonly:
        session.flush()
        if not session.expire_on_commit:
            session.expunge_all()
        session.rollback()
        session.info[COMMITTED_KEY] = True  # a read-only scope that ended well counts as one
    else:
        session.commit()


def watch_commit(session: Session) -> None:
    """Record the next commit of ``session`` (the unit of work's own: its savepoints have
    ended) in ``session.info``, from SQLAlchemy's ``after_commit`` event.

    The recorder is a C function, so no interrupt can fall between the commit and the
    record: the hooks of a committed transaction run even when an interrupt or a task
    cancellation arrives while the commit returns its connection or the session closes.
    A ``ScopeSession`` calls it from its class-level listener (an instance-level listener
    costs SQLAlchemy a dispatcher of the session's own: 6% of a one-query unit of work).
    """
    record = functools.partial(operator.setitem, session.info, COMMITTED_KEY)
    if isinstance(session, ScopeSession):
        session._dbsession_on_commit = functools.partial(record, True)
    else:  # not a session of dbsession's makers: the slow way
        event.listen(session, "after_commit", record)


def was_committed(session: Session) -> bool:
    """True (once) if ``watch_commit`` saw ``session`` commit (or ``end_transaction`` end
    a read-only scope without an error)."""
    return session.info.pop(COMMITTED_KEY, None) is not None


def rollback_quietly(session: Session) -> None:
    """Roll back without letting a failing rollback hide the exception that caused it."""
    try:
        session.rollback()
    except Exception:
        logger.warning("dbsession: rollback failed after an error in the scope", exc_info=True)


def close_quietly(session: Session) -> None:
    """Close the session; a failure to return the connection is logged, not raised (the
    transaction has already ended, and the pool discards a broken connection)."""
    try:
        session.close()
    except Exception:
        logger.warning("dbsession: closing the session failed", exc_info=True)
