"""The stack of active scopes, who owns each, and after-commit hooks.

Pure Python with no I/O, so the sync scopes and the async ones drive it alike.

**Ownership.** A scope belongs to the code running inside its ``with`` block. The
stack itself lives in a ``ContextVar``, which is *copied* into child tasks,
``copy_context().run``, ``asyncio.to_thread`` and thread pools, and which a generator
suspended inside a scope leaves set for its consumer. So the owner is recorded once,
when the scope is entered: the thread, and the entering Python frame when that frame
can suspend (a generator, a coroutine or an async generator). A frame found on the
stack is trusted only when it is

- still open (its scope has not ended, wherever it ended),
- in the thread that entered it, and
- if it was entered by a frame that can suspend, while that frame is running (not
  while a child task runs and its parent coroutine waits, nor while a generator's
  consumer runs and the generator waits at a ``yield``),

or when it was explicitly *lent* to the code that sees it (a web integration that
opens the scope in a dependency and runs the handler elsewhere). Each test is O(1):
no walk of the call stack, whatever its depth. Anything else is invisible:
``current_session()`` raises NoActiveScopeError and a new scope is a new unit of
work. Dead frames are pruned from the stack the next time it is pushed.

The stack holds its frames *weakly*: the scope object (``UnitOfWork`` ...) that the
``with`` statement keeps owns its frame. So a scope abandoned half-way (an interrupt
that arrived before its ``__exit__`` could end it) leaves nothing behind once its
``with`` statement is gone: no frame on the stack, and no session holding a connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from inspect import CO_ASYNC_GENERATOR, CO_COROUTINE, CO_GENERATOR, CO_ITERABLE_COROUTINE
from types import FrameType
from typing import TypeVar

from sqlalchemy.orm import Session

from ._errors import NoActiveScopeError

logger: logging.Logger = logging.getLogger("dbsession")

Hook = Callable[[], object]
S = TypeVar("S")

_CONTEXTLIB_FILES = frozenset({contextlib.__file__})
_SUSPENDS = CO_GENERATOR | CO_COROUTINE | CO_ASYNC_GENERATOR | CO_ITERABLE_COROUTINE
_LENT = -1  # the thread of a lent frame: any code that sees the context


@dataclass(eq=False)
class Frame:
    """One active scope: its session, the factory that opened it, and its pending hooks.

    ``parent`` is set for a savepoint joined to an outer scope. ``entered_by`` is the
    Python frame that entered the scope (for observability's call site); ``thread``
    and ``suspends`` record its owner (see ``claim``); ``open`` turns False when it
    ends, in whatever context that happens. ``doomed`` holds the error that lost the
    transaction inside a savepoint: the outermost scope then refuses to commit.
    ``failed`` (outermost scope only) lists the statements that failed while it was
    open: ``(connection, error, innermost savepoint then open)``.
    """

    session: object
    owner: object
    readonly: bool = False
    isolation_level: str | None = None
    parent: Frame | None = None
    hooks: list[Hook] = field(default_factory=list)
    entered_by: FrameType | None = None
    open: bool = True
    thread: int = 0
    suspends: FrameType | None = None
    doomed: BaseException | None = None
    failed: list[tuple[object, BaseException, object]] | None = None

    @property
    def root(self) -> Frame:
        """The outermost scope of this unit of work (itself, if it is not a savepoint)."""
        frame = self
        while frame.parent is not None:
            frame = frame.parent
        return frame

    def claim(self, entered_by: FrameType | None) -> None:
        """Record the owner: the running thread, and ``entered_by`` (the Python frame that
        runs the ``with`` statement) if it can suspend while the scope is open."""
        self.entered_by = entered_by
        self.thread = threading.get_ident()
        if entered_by is not None and entered_by.f_code.co_flags & _SUSPENDS:
            self.suspends = entered_by

    def hand_up(self) -> None:
        """A savepoint was released: its hooks now wait for the parent's commit."""
        if self.parent is not None:
            self.parent.hooks.extend(self.hooks)
        self.hooks.clear()

    def visible(self) -> bool:
        """True if the running code may use this scope (see the module docstring)."""
        if not self.open:
            return False
        thread = self.thread
        if thread != threading.get_ident():
            return thread == _LENT
        suspends = self.suspends
        # A generator or coroutine frame has no caller while it waits (at a yield or an
        # await); while it runs in this thread, the running code is called from it.
        return suspends is None or suspends.f_back is not None


_stack: ContextVar[tuple[weakref.ref[Frame], ...]] = ContextVar("dbsession_scopes", default=())


def frames() -> list[Frame]:
    """The open scopes on this context's stack, innermost last, visible here or not."""
    live = (ref() for ref in _stack.get())
    return [frame for frame in live if frame is not None and frame.open]


def entering_frame(depth: int) -> FrameType | None:
    """The Python frame ``depth`` levels above the caller that runs the ``with`` statement,
    skipping contextlib's own frames (``ExitStack.enter_context``, ``@contextmanager``)."""
    python_frame: FrameType | None = sys._getframe(depth + 1)
    while python_frame is not None and python_frame.f_code.co_filename in _CONTEXTLIB_FILES:
        python_frame = python_frame.f_back
    return python_frame


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_EXAMPLE = _PACKAGE + "example" + os.sep


def call_site(python_frame: FrameType | None) -> tuple[str, int]:
    """``(file, line)`` of the first frame at or above ``python_frame`` outside dbsession's
    own modules (so a scope opened by run_in_transaction or a web integration is named
    for the code that asked for it)."""
    while python_frame is not None:
        filename = python_frame.f_code.co_filename
        if not filename.startswith(_PACKAGE) or filename.startswith(_EXAMPLE):
            return filename, python_frame.f_lineno
        python_frame = python_frame.f_back
    return "<unknown>", 0


def _open_refs(stack: tuple[weakref.ref[Frame], ...]) -> tuple[weakref.ref[Frame], ...]:
    return tuple(ref for ref in stack if (frame := ref()) is not None and frame.open)


def push(frame: Frame) -> None:
    """Make ``frame`` the innermost scope of this context, dropping frames that have ended."""
    stack = _stack.get()
    _stack.set((*_open_refs(stack), weakref.ref(frame)) if stack else (weakref.ref(frame),))


def pop(frame: Frame) -> None:
    """End ``frame``: it is never visible again, here or in any context that copied it."""
    frame.open = False
    frame.entered_by = frame.suspends = None
    stack = _stack.get()
    if not stack:
        return
    if stack[-1]() is frame:  # the usual case: the innermost scope ends
        _stack.set(_open_refs(stack[:-1]) if len(stack) > 1 else ())
    elif any(ref() is frame for ref in stack):
        _stack.set(_open_refs(stack))


def innermost(owner: object | None = None) -> Frame | None:
    """The innermost scope visible to the running code (of ``owner`` if given), or None."""
    if not _stack.get():
        return None
    for frame in reversed(frames()):
        if (owner is None or frame.owner is owner) and frame.visible():
            return frame
    return None


def lend(frame: Frame) -> None:
    """Make ``frame`` visible to whatever code sees this context until its scope ends
    (for integrations that open a scope in one context and run the handler in another):
    the owner becomes that context, whatever thread or task runs it."""
    frame.thread = _LENT
    frame.suspends = None
    push(frame)


def _require_frame(what: str) -> Frame:
    frame = innermost()
    if frame is None:
        raise NoActiveScopeError(
            f"{what} was called outside any session_scope(). Call it inside a "
            "'with session_scope() as session:' block ('async with "
            "async_session_scope()' in async code, or a function run by "
            "run_in_transaction), in the same thread or asyncio task; a child task, "
            "thread or generator does not share its parent's scope."
        )
    return frame


def current_session() -> Session:
    """Return the session of the innermost scope open in this thread or asyncio task.

    Inside a scope joined to an outer one that is the outer scope's session (the
    savepoint shares it). Raises NoActiveScopeError outside any scope (a child task,
    thread or a generator's consumer is outside), and inside an async scope (use
    ``dbsession.asyncio.async_current_session()`` there).
    """
    return session_of_scope(
        Session, "current_session()", "dbsession.asyncio.async_current_session()"
    )


def session_of_scope(kind: type[S], what: str, instead: str) -> S:
    """The innermost visible scope's session if it is a ``kind``; else NoActiveScopeError
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

    The hook is dropped if that transaction rolls back, or if the joined scope
    (savepoint) that registered it rolls back. Hooks run in registration order,
    once, after the session is closed, even if the task is cancelled or interrupted
    while the session closes. A read-only scope that ends without an error counts as
    committed. A hook that raises is logged (logger ``dbsession``, level ERROR, with
    the traceback) and the remaining hooks still run; the exception does not
    propagate, because the transaction is already committed. Raises
    NoActiveScopeError outside any scope of this thread or task.
    """
    _require_frame("on_commit()").hooks.append(hook)


#: ``Session.info`` key: a callable that receives the hooks of a committed unit of work
#: instead of running them (dbsession.testing: the commit was only a SAVEPOINT release).
DIVERT_HOOKS_KEY = "dbsession_divert_on_commit"


def run_hooks(hooks: list[Hook], session: object = None) -> None:
    """Run after-commit hooks in order; log, and do not propagate, an Exception from one.

    If ``session``'s info names a diverter (``DIVERT_HOOKS_KEY``), hand it the hooks instead.
    """
    info = getattr(session, "info", None)
    divert = info.get(DIVERT_HOOKS_KEY) if info else None
    if divert is not None and hooks:
        divert(list(hooks))
        return
    for hook in hooks:
        try:
            hook()
        except Exception:
            logger.exception("dbsession: on_commit hook %r raised; the commit stands", hook)
