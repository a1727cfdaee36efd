"""Flask: a view that is one unit of work (``pip install 'sqlalchemy-dbsession[flask]'``).

::

    @app.post("/customers")
    @unit_of_work()
    def create_customer(session: Session) -> tuple[dict[str, object], int]:
        ...

The decorated view gets a real SQLAlchemy Session from ``session_scope()`` as its
first argument (URL variables follow as keyword arguments). When the view returns,
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
from typing import Any, Concatenate, ParamSpec, TypeVar, cast, overload

from sqlalchemy.orm import Session

from .. import observability
from .._factory import DbSessionFactory, default_factory
from .._retry import UnitOfWorkFunction

__all__ = ["unit_of_work"]

P = ParamSpec("P")
R = TypeVar("R")
View = Callable[Concatenate[Session, P], R]


@overload
def unit_of_work(view: View[P, R], /) -> Callable[P, R]: ...
@overload
def unit_of_work(
    factory: DbSessionFactory | None = None, /, *, readonly: bool = False
) -> Callable[[View[P, R]], Callable[P, R]]: ...
def unit_of_work(
    target: Callable[..., Any] | DbSessionFactory | None = None, /, *, readonly: bool = False
) -> Any:
    """Decorate a sync view so that it runs as one unit of work and receives its session.

    ``@unit_of_work``, ``@unit_of_work()``, ``@unit_of_work(factory)`` or
    ``@unit_of_work(readonly=True)`` (a read-only scope: GET views that only read
    never take a write lock). Without a factory it uses the process default factory,
    looked up on each request. Works on ``MethodView`` methods (``self`` first, then
    the session), and in ``MethodView.decorators = [unit_of_work()]``: each request is
    then one unit of work, whose session the methods get from
    ``dbsession.current_session()``. Raises TypeError when applied to an ``async def``
    view (the scope would commit before the coroutine ran). Opening the scope raises
    DatabaseUnreachableError when no connection can be had.
    """
    factory = target if isinstance(target, DbSessionFactory) else None

    def open_scope() -> AbstractContextManager[Session]:
        return (factory or default_factory()).session_scope(readonly=readonly)

    def decorate(view: Callable[..., Any]) -> Any:
        if inspect.iscoroutinefunction(view):
            raise TypeError(
                f"@unit_of_work cannot wrap the async view {view.__qualname__}: make it a "
                "plain def view, or open a scope inside it."
            )

        def run(unit: Callable[[Session], R]) -> R:
            with open_scope() as session:
                observability._name_current(view)
                return unit(session)

        if not _takes_a_session(view):
            # A class-based view's function (View.decorators = [unit_of_work()]): it only
            # takes the URL's keywords, so it runs whole in the scope, and its methods
            # read the session with dbsession.current_session().
            @functools.wraps(view)
            def whole(*args: Any, **kwargs: Any) -> Any:
                return run(lambda session: view(*args, **kwargs))

            return whole
        return UnitOfWorkFunction(view, run)

    if target is None or factory is not None:
        return decorate
    return decorate(cast(Callable[..., Any], target))


def _takes_a_session(view: Callable[..., Any]) -> bool:
    """False for a view with no positional parameter (``def view(**kwargs)``, the function
    Flask's ``View.as_view`` makes): it cannot be handed the session."""
    try:
        parameters = inspect.signature(view).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(
        p.kind in positional or p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters
    )
