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
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, SessionTransaction

from . import observability
from ._classify import transient_reason
from ._context import Frame, entering_frame, frames, pop, push, run_hooks
from ._errors import NeedsRollbackError, ScopeError, TransactionAbortedError
from ._guard import GUARD_KEY, guard, unguard

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

logger: logging.Logger = logging.getLogger("dbsession")

S = TypeVar("S")

#: ``session.info`` key: set by the database commit of the unit of work (``watch_commit``).
COMMITTED_KEY = "dbsession_committed"


class ScopeSession(Session):
    """The Session class of dbsession's sessionmakers: a plain SQLAlchemy Session, except
    while a scope's unit of work owns it (``in_scope``):

    - ``commit()`` only flushes: the unit of work commits when its scope ends, so code
      that calls ``session.commit()`` itself (SQLModel- and tutorial-style helpers)
      keeps the unit all or nothing;
    - ``rollback()`` (and ``reset()``) rolls the whole transaction back and dooms the
      unit: its scope then refuses to commit (NeedsRollbackError).
    """

    #: True while the session belongs to an open unit of work (set by ``UnitOfWork``).
    _dbsession_in_scope: bool = False
    #: Set by ``rollback()`` called inside the scope.
    _dbsession_rolled_back: bool = False
    #: What each commit of the session calls (a no-op); ``watch_commit`` sets it for the
    #: unit of work's own commit. Class-level, so no per-session event set-up is paid.
    _dbsession_on_commit: Callable[[], object] = staticmethod(tuple)

    def commit(self) -> None:
        """Inside a scope: flush, and leave the commit to the end of the scope. Outside
        one: ``Session.commit()``."""
        if self._dbsession_in_scope:
            self.flush()
            return
        super().commit()

    def rollback(self) -> None:
        """``Session.rollback()``; inside a scope it also dooms the unit of work, whose
        scope then raises NeedsRollbackError instead of committing."""
        if self._dbsession_in_scope:
            self._dbsession_rolled_back = True
        super().rollback()

    def reset(self) -> None:
        """``Session.reset()``, which rolls back too: inside a scope it dooms the unit of
        work like ``rollback()``."""
        if self._dbsession_in_scope:
            self._dbsession_rolled_back = True
        super().reset()


# The commit record: a plain class-level after_commit listener. Only C functions run in
# it (see watch_commit); the partial because SQLAlchemy keeps a weak reference to a
# listener, which a methodcaller refuses.
event.listen(
    ScopeSession,
    "after_commit",
    functools.partial(operator.methodcaller("_dbsession_on_commit")),
)


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
        owned: Any = session if isinstance(session, Session) else session.sync_session  # type: ignore[attr-defined]
        owned._dbsession_in_scope = True
        frame = Frame(session, self._owner, self._readonly, self._isolation_level)
        frame.claim(entered_by)
        self._frame = frame
        push(frame)
        self._observation = observability._begin(
            frame.entered_by, self._owner, self._readonly, self._isolation_level
        )
        return session

    def _finish(self, session: Session | AsyncSession, error: BaseException | None) -> None:
        """The last step of both exits, once the session is closed (``error`` is what ended
        the scope, None after a commit): end the scope's visibility, run the on_commit
        hooks if the unit of work committed, end its observation with what the database
        did (a task cancelled while its COMMIT ran has committed). Each step runs even if
        an interrupt cuts the one before it short."""
        try:
            committed = False
            pop(self._frame)
        finally:
            try:
                committed = was_committed(session)
                if committed and self._frame.hooks:
                    run_hooks(self._frame.hooks, session)
            finally:
                try:
                    if self._observation is not None:
                        outcome = "committed" if committed else "rolled back"
                        observability._end(self._observation, outcome, error)
                finally:
                    if self._frame.open:  # an interrupt cut the first pop short
                        pop(self._frame)


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
                commit_unit(session, frame)
            else:
                rollback_quietly(session)
        except BaseException as failure:
            error = failure
            rollback_quietly(session)
            raise
        finally:
            try:
                close_quietly(session)
            finally:
                self._finish(session, error)


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
        frame.claim(entering_frame(1))
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
    parent), or roll it back after ``exc``; raise whatever the release raised. A clean
    exit after a statement in the scope failed (the error was caught) rolls back to the
    SAVEPOINT and raises NeedsRollbackError: the outer unit of work can catch it and go
    on; after ``session.rollback()`` inside it, that raises at once (the whole unit is
    already rolled back)."""
    try:
        if exc is None:
            if getattr(session, "_dbsession_rolled_back", False):
                raise NeedsRollbackError(
                    "session.rollback() or session.reset() was called inside a joined scope: "
                    "it rolled back the whole unit of work, not only the joined scope. Raise "
                    "an exception out of the joined scope instead to undo only its part."
                )
            try:
                if frame.root.failed:
                    refuse_failed(session, frame, transaction)
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


def commit_unit(session: Session, frame: Frame) -> None:
    """End the unit of work of ``frame`` whose block raised nothing: refuse to commit
    (TransactionAbortedError, NeedsRollbackError) if it must not, else ``end_transaction``."""
    if isinstance(session, ScopeSession):
        session._dbsession_in_scope = False
        if session._dbsession_rolled_back:
            raise NeedsRollbackError(
                "The unit of work cannot commit: session.rollback() or session.reset() was "
                "called inside its scope, which rolled back the whole transaction. Nothing "
                "was saved. To undo only part of a unit, put that part in a joined "
                "session_scope() and raise."
            )
    if frame.doomed is not None:
        refuse_doomed(frame)
    if frame.readonly:
        end_transaction(session, roll_back=bool(frame.failed or session.info.get(GUARD_KEY)))
        return
    if frame.failed:
        refuse_failed(session, frame, None)
    end_transaction(session)


def refuse_failed(session: Session, frame: Frame, savepoint: SessionTransaction | None) -> None:
    """Raise NeedsRollbackError if a statement of ``session`` failed inside the unit of
    work of ``frame`` (``savepoint``: inside that joined scope) and the error was caught:
    on PostgreSQL that transaction is already aborted, and no backend may report a
    commit of it as if every statement had run."""
    failed = frame.root.failed
    if not failed:
        return
    error = _caught(session, failed, savepoint)
    if error is None:
        return
    where = "unit of work" if savepoint is None else "joined scope"
    raise NeedsRollbackError(
        f"The {where} cannot commit: a statement in it failed ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}) and the error was caught "
        "inside the scope. Everything in it was rolled back. To let an optional statement "
        "fail and keep the rest, run it in a joined scope: 'with session_scope(): ...' "
        "inside the try, and catch the error outside it."
    ) from error


def _caught(
    session: Session,
    failed: list[tuple[object, BaseException, object]],
    savepoint: SessionTransaction | None,
) -> BaseException | None:
    """The last error in ``failed`` that still stands for ``session``'s transaction (or
    for ``savepoint`` and the savepoints inside it), or None. A failure inside a savepoint
    that has since ended (rolled back, or released by code of the app's own) is settled."""
    transaction = session.get_transaction()
    if transaction is None or not transaction.is_active:
        return failed[-1][1]  # a flush failed: SQLAlchemy itself awaits the rollback
    connection = session.connection()
    for failed_on, error, nested in reversed(failed):
        if failed_on is not connection:
            continue  # another connection's statement (engine.connect() in the scope)
        if savepoint is None:
            if nested is None or getattr(nested, "is_active", False):
                return error
            continue
        inner: Any = nested
        while inner is not None and inner is not savepoint:
            inner = inner.parent
        if inner is savepoint and (nested is savepoint or nested.is_active):  # type: ignore[attr-defined]
            return error
    return None


def note_failed_statement(context: ExceptionContext) -> None:
    """``handle_error`` listener (one per engine, run only when a statement fails): note
    a database error on the outermost scope of every unit of work visible here, so
    that a scope whose code catches it refuses to commit (``refuse_failed``)."""
    error = context.sqlalchemy_exception
    connection = context.connection
    if connection is None or context.is_pre_ping or not isinstance(error, DBAPIError):
        return
    for frame in frames():
        if not frame.visible():
            continue
        session = getattr(frame.session, "sync_session", frame.session)
        root = frame.root
        if not isinstance(session, Session) or (root.failed and root.failed[-1][1] is error):
            continue
        noted = (connection, error, session.get_nested_transaction())
        if root.failed is None:
            root.failed = [noted]
        else:
            root.failed.append(noted)


def end_transaction(session: Session, *, roll_back: bool = False) -> None:
    """End a scope's transaction that raised nothing: commit it. A read-only one commits
    too (the database refuses its writes, so pending ORM changes raise ReadOnlyError
    instead of vanishing; and a read-only transaction's COMMIT costs what a ROLLBACK
    does), unless ``roll_back``: a read-only scope the database cannot enforce (guarded,
    joined to a test's transaction) or whose statement failed is flushed (so pending ORM
    changes raise) and rolled back, keeping the loaded objects readable as a commit does
    (unless expire_on_commit).

    SAVEPOINTs the block left open (``session.begin_nested()``) are released first:
    SQLAlchemy reports each release as a commit, which must not count as the unit's.
    """
    while session.in_nested_transaction():
        session.get_nested_transaction().commit()  # type: ignore[union-attr]
    watch_commit(session)
    if not roll_back:
        session.commit()
        return
    session.flush()
    if not session.expire_on_commit:
        session.expunge_all()
    session.rollback()
    session.info[COMMITTED_KEY] = True  # a read-only scope that ended well counts as one


def watch_commit(session: Session) -> None:
    """Record the next commit of ``session`` (the unit of work's own: its savepoints have
    ended) in ``session.info``, from SQLAlchemy's ``after_commit`` event.

    The recorder is made of C functions only, so no Python line of its own can be
    interrupted. The window is not closed, though: SQLAlchemy runs Python code between
    the database's COMMIT and ``after_commit`` (it ends the transaction's state and
    dispatches the event). An interrupt (``KeyboardInterrupt``, an exception from a
    signal handler) that lands there leaves a committed unit unrecorded, and its
    on_commit hooks do not run. Task cancellation cannot land there: the async scope
    runs its commit to completion in a task of its own. Once recorded, the hooks run
    even when an interrupt or a cancellation arrives while the connection is returned
    or the session closes. A ``ScopeSession`` calls the recorder from its class-level
    listener (an instance-level listener costs SQLAlchemy a dispatcher of the session's
    own: 6% of a one-query unit of work).
    """
    if isinstance(session, ScopeSession):
        session._dbsession_on_commit = functools.partial(
            operator.setitem, session.info, COMMITTED_KEY, True
        )
    else:  # not a session of dbsession's makers: the slow way
        record = functools.partial(operator.setitem, session.info, COMMITTED_KEY)
        event.listen(session, "after_commit", record)


def was_committed(session: Session | AsyncSession) -> bool:
    """True (once) if ``watch_commit`` saw ``session`` commit (or ``end_transaction`` end
    a read-only scope without an error)."""
    return session.info.pop(COMMITTED_KEY, None) is not None


def rollback_quietly(session: Session) -> None:
    """Roll back without letting a failing rollback hide the exception that caused it
    (the unit of work's session leaves its scope: ``commit()`` is SQLAlchemy's again)."""
    if isinstance(session, ScopeSession):
        session._dbsession_in_scope = False
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
