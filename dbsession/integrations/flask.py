"""Flask: a view that is one unit of work (``pip install 'dbsession[flask]'``).

::

    @app.post("/customers")
    @unit_of_work()
    def create_customer(session: Session) -> tuple[dict[str, object], int]:
        ...

The decorated view gets a real SQLAlchemy Session from ``session_scope()`` as its
first argument (``@unit_of_work(readonly=True)``: from ``session_scope(readonly=True)``,
for views that only read) (URL variables follow as keyword arguments). When the view returns,
the unit of work is committed, before Flask builds and sends the response; when it
raises (``abort(409)`` after writes included, and exceptions that an error handler
turns into a response), it is rolled back and the exception goes on to Flask. A
commit that fails becomes an error response, never a success.

Why not ``before_request`` / ``teardown_request``: Flask passes ``teardown_request``
only the exceptions that no error handler handled (``abort()`` arrives as ``None``),
and it runs after the response status is fixed. See docs/web.md.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Concatenate, ParamSpec, TypeVar

from sqlalchemy.orm import Session

from .._factory import DbSessionFactory, session_scope

__all__ = ["unit_of_work"]

P = ParamSpec("P")
R = TypeVar("R")


def unit_of_work(
    factory: DbSessionFactory | None = None, *, readonly: bool = False
) -> Callable[[Callable[Concatenate[Session, P], R]], Callable[P, R]]:
    """Decorate a sync view so that it runs as one unit of work and receives its session.

    Without ``factory`` it uses the process default factory, looked up on each
    request. ``readonly=True`` (for GET views) runs it in ``session_scope(readonly=True)``:
    it never takes a write lock (on SQLite it does not queue behind writers), and a
    write in it raises ReadOnlyError. Raises TypeError when applied to an ``async def``
    view (the scope would commit before the coroutine ran). Opening the scope raises
    DatabaseUnreachableError when no connection can be had.
    """
    scope: Callable[..., AbstractContextManager[Session]] = (
        session_scope if factory is None else factory.session_scope
    )

    def open_scope() -> AbstractContextManager[Session]:
        return scope(readonly=readonly)

    def decorate(view: Callable[Concatenate[Session, P], R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(view):
            raise TypeError(
                f"@unit_of_work() cannot wrap the async view {view.__qualname__}: make it a "
                "plain def view, or open a scope inside it."
            )

        @functools.wraps(view)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with open_scope() as session:
                return view(session, *args, **kwargs)

        return run

    return decorate
