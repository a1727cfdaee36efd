"""The stack of active scopes of the running thread or asyncio task, and after-commit hooks.

Pure Python with no I/O, so the sync scopes and an async side drive it alike:
``entered(frame)`` while a scope is open; on success a savepoint's hooks are
``handed_up`` to its parent, and an outermost scope runs ``run_hooks(frame.hooks)``
after its commit; on failure the frame's hooks are simply dropped.

The stack lives in a ``ContextVar``: each thread has its own, and each asyncio
task starts from a copy of its creator's, so scopes never leak between them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy.orm import Session

from ._errors import NoActiveScopeError

logger = logging.getLogger("dbsession")

Hook = Callable[[], object]
S = TypeVar("S")


@dataclass(eq=False)
class Frame:
    """One active scope: its session, the factory that opened it, and its pending hooks.

    ``parent`` is set for a savepoint (``nested=True`` joined to an outer scope).
    """

    session: object
    owner: object
    readonly: bool = False
    isolation_level: str | None = None
    parent: Frame | None = None
    hooks: list[Hook] = field(default_factory=list)

    def hand_up(self) -> None:
        """A savepoint was released: its hooks now wait for the parent's commit."""
        if self.parent is not None:
            self.parent.hooks.extend(self.hooks)
        self.hooks.clear()


_stack: ContextVar[tuple[Frame, ...]] = ContextVar("dbsession_scopes", default=())


@contextmanager
def entered(frame: Frame) -> Iterator[Frame]:
    """Make ``frame`` the innermost active scope for the duration of the block."""
    _stack.set((*_stack.get(), frame))
    try:
        yield frame
    finally:
        # By identity, not by token: generators may close their scopes out of order.
        _stack.set(tuple(f for f in _stack.get() if f is not frame))


def innermost(owner: object | None = None) -> Frame | None:
    """The innermost active scope (of ``owner`` if given), or None."""
    for frame in reversed(_stack.get()):
        if owner is None or frame.owner is owner:
            return frame
    return None


def _require_frame(what: str) -> Frame:
    frame = innermost()
    if frame is None:
        raise NoActiveScopeError(
            f"{what} was called outside any session_scope(). Call it inside a "
            "'with session_scope() as session:' block ('async with "
            "async_session_scope()' in async code, or a function run by "
            "run_in_transaction), in the same thread or asyncio task."
        )
    return frame


def current_session() -> Session:
    """Return the session of the innermost active scope of this thread or asyncio task.

    Inside ``session_scope(nested=True)`` that is the outer scope's session (the
    savepoint shares it). Raises NoActiveScopeError outside any scope, and inside an
    async scope (use ``dbsession.asyncio.current_async_session()`` there).
    """
    return session_of_scope(
        Session, "current_session()", "dbsession.asyncio.current_async_session()"
    )


def session_of_scope(kind: type[S], what: str, instead: str) -> S:
    """The innermost active scope's session if it is a ``kind``; else NoActiveScopeError
    naming ``what`` was called and what to call ``instead``."""
    session = _require_frame(what).session
    if not isinstance(session, kind):
        raise NoActiveScopeError(
            f"{what} was called inside a scope whose session is a "
            f"{type(session).__name__}; call {instead} there instead."
        )
    return session


def on_commit(hook: Hook) -> None:
    """Run ``hook()`` after the outermost transaction of the innermost scope commits.

    The hook is dropped if that transaction rolls back, or if the savepoint
    (``nested=True``) that registered it rolls back. Hooks run in registration
    order, once, after the session is closed. A read-only scope that ends without
    an error counts as committed. A hook that raises is logged (logger
    ``dbsession``, level ERROR, with the traceback) and the remaining hooks still
    run; the exception does not propagate, because the transaction is already
    committed. Raises NoActiveScopeError outside any scope.
    """
    _require_frame("on_commit()").hooks.append(hook)


def run_hooks(hooks: list[Hook]) -> None:
    """Run after-commit hooks in order; log, and do not propagate, an Exception from one."""
    for hook in hooks:
        try:
            hook()
        except Exception:
            logger.exception("dbsession: on_commit hook %r raised; the commit stands", hook)
