"""One engine and its sessionmakers: one per kind of scope (read-only or not, isolation level)."""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ._config import isolation_name
from ._engine import isolation_levels, scope_engine
from ._errors import UnsupportedIsolationLevelError
from ._guard import guard
from ._readonly import remember_twin
from ._scope import note_failed_statement
from ._timeouts import check_timeout, end_budget, start_budget

E = TypeVar("E")
M = TypeVar("M")


def normalize_isolation_level(level: str | None) -> str | None:
    """``"read_committed"`` -> ``"READ COMMITTED"``; AUTOCOMMIT is refused (a scope is a
    transaction). Raises UnsupportedIsolationLevelError."""
    if level is None:
        return None
    normalized = isolation_name(level)
    if normalized == "AUTOCOMMIT":
        raise UnsupportedIsolationLevelError(
            "isolation_level='AUTOCOMMIT' cannot be used for a scope: a scope is one "
            "transaction. Use engine.connect().execution_options(isolation_level="
            "'AUTOCOMMIT') for statements outside a transaction."
        )
    return normalized


class Binding(Generic[E, M]):
    """An engine and, made once each and cached, the sessionmaker of every kind of scope.

    ``E`` is the engine (``Engine`` or ``AsyncEngine``), ``M`` the sessionmaker kind,
    made by ``maker_type`` (``sessionmaker`` or ``async_sessionmaker``) on
    ``_engine.scope_engine``: a view of the engine sharing its pool (read-only scopes:
    of the read-only twin engine, which ``make_twin`` builds on first use and
    :meth:`engines` hands over for disposal with the engine); see
    ``_engine.scope_options`` for what each kind sets. ``sync_engine`` is where the
    dialect and events live (the engine itself on the sync side).
    """

    def __init__(
        self,
        engine: E,
        sync_engine: Engine,
        maker_type: Callable[..., M],
        *,
        expire_on_commit: bool,
        session_options: dict[str, Any],
        make_twin: Callable[[], E] | None = None,
    ) -> None:
        self.engine = engine
        # A scope's code that catches a failed statement's error must not commit the rest.
        event.listen(sync_engine, "handle_error", note_failed_statement)
        self._make_twin = make_twin
        self._twin: E | None = None
        self.expire_on_commit = expire_on_commit
        # close_resets_only=False: a session is dead after its scope; a use after the
        # block raises instead of quietly beginning a transaction nobody commits.
        self._session_options = {
            "expire_on_commit": expire_on_commit,
            "close_resets_only": False,
            **session_options,
        }
        self._sync_engine = sync_engine
        self._maker_type = maker_type
        self._makers: dict[tuple[bool, str | None, bool], M] = {}
        self._levels: tuple[str, ...] | None = None
        self._lock = threading.Lock()
        self._joined: dict[bool, M] | None = None
        self._joined_makers: dict[bool, M] | None = None

    def read_only_engine(self) -> E | None:
        """The read-only twin engine (built on first use), or None for a PostgreSQL driver
        without a read-only flag (``_readonly``)."""
        if self._twin is None and self._make_twin is not None:
            with self._lock:
                if self._twin is None:
                    twin = self._make_twin()
                    built: Any = twin
                    sync_twin = getattr(built, "sync_engine", built)
                    event.listen(sync_twin, "handle_error", note_failed_statement)
                    primary: Any = self.engine
                    remember_twin(getattr(primary, "sync_engine", primary), sync_twin)
                    self._twin = twin
        return self._twin

    def engines(self) -> list[E]:
        """The engines built so far, to dispose: the engine and its twin if built."""
        return [self.engine] if self._twin is None else [self.engine, self._twin]

    def maker(
        self,
        *,
        readonly: bool = False,
        isolation_level: str | None = None,
        timeout: float | None = None,
        timed: bool = False,
    ) -> M:
        """The sessionmaker for this kind of scope; ``isolation_level`` already normalized,
        ``timeout`` the scope's time budget in seconds (see ``_timeouts``): then a maker
        of sessions that apply it, made from the one ``timed`` maker of that kind.

        Raises UnsupportedIsolationLevelError if the backend has no such level,
        ConfigurationError for a timeout that is not a positive number.
        """
        if self._joined is not None:
            return self._joined[readonly]
        if timeout is not None:
            seconds = check_timeout(timeout)
            maker = self.maker(readonly=readonly, isolation_level=isolation_level, timed=True)
            return cast(M, functools.partial(cast(Any, maker), dbsession_budget=seconds))
        key = (readonly, isolation_level, timed)
        made = self._makers.get(key)
        if made is not None:
            return made
        if isolation_level is not None:
            self._check_level(isolation_level)
        twin = self.read_only_engine() if readonly else None
        with self._lock:
            made = self._makers.get(key)
            if made is None:
                bind = scope_engine(
                    self.engine,
                    self._sync_engine,
                    readonly=readonly,
                    isolation_level=isolation_level,
                    timed=timed,
                    read_only_engine=twin,
                )
                options = self._session_options
                if timed:
                    options = {**options, **_timed_session_options(options)}
                made = self._maker_type(bind=bind, **options)
                self._makers[key] = made
            return made

    def joined_to(
        self,
        connection: Any,
        *,
        info: dict[str, Any] | None = None,
        wrap: Callable[[M], M] | None = None,
    ) -> Binding[E, M]:
        """A Binding on the same engine whose every session joins ``connection``'s transaction.

        ``connection`` is a ``Connection`` (``AsyncConnection`` on the async side) whose
        transaction the caller owns. For dbsession.testing: a session's commit releases
        a SAVEPOINT and its rollback rolls back to it, while the outer transaction stays
        open. Isolation level requests are not applied (the transaction is already
        open); a read-only scope gets the read-only guard of ``ScopeSession``, so its
        writes raise ReadOnlyError as they would in its own read-only transaction.
        Every session starts with ``info`` in its ``Session.info``; ``wrap`` may wrap
        each of the two sessionmakers (to check who asks for a session).
        """
        # A sessionmaker makes a Session subclass of its own (with SQLAlchemy's class-level
        # event set-up) when built: one per test was measurable. Made once per Binding.
        makers = self._joined_makers
        if makers is None:
            makers = self._joined_makers = {
                readonly: self._maker_type(
                    join_transaction_mode="create_savepoint", **self._session_options
                )
                for readonly in (False, True)
            }
        clone = copy.copy(self)
        clone._makers = {}
        clone._lock = threading.Lock()
        clone._joined = {}
        for readonly, maker in makers.items():
            bound = cast(M, _BoundMaker(maker, connection, info or {}, guarded=readonly))
            clone._joined[readonly] = wrap(bound) if wrap else bound
        return clone

    def _check_level(self, level: str) -> None:
        if self._levels is None:
            levels = isolation_levels(self._sync_engine)
            self._levels = tuple(level for level in levels if level != "AUTOCOMMIT")
        if level not in self._levels:
            raise UnsupportedIsolationLevelError(
                f"Isolation level {level!r} is not supported by "
                f"{self._sync_engine.dialect.name}; use one of: {', '.join(sorted(self._levels))}."
            )


_timed_classes: dict[type[Any], type[Any]] = {}


def _timed_session_options(options: dict[str, Any]) -> dict[str, Any]:
    """The session class options of a timed maker: a subclass of the session class whose
    sessions start a scope's budget (``_timeouts.start_budget``) when made and end it when
    closed (``class_`` on the sync side, ``sync_session_class`` on the async one)."""
    name = "sync_session_class" if "sync_session_class" in options else "class_"
    base = options.get(name, Session)
    timed = _timed_classes.get(base)
    if timed is None:
        timed = _timed_classes[base] = type(f"Timed{base.__name__}", (_TimedMixin, base), {})
    return {name: timed}


class _TimedMixin:
    """Mixed into a Session class: the session carries a scope's time budget."""

    def __init__(self, *args: Any, dbsession_budget: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dbsession_budget = start_budget(dbsession_budget, owner=self)

    def close(self) -> None:
        try:
            super().close()  # type: ignore[misc]
        finally:
            end_budget(self._dbsession_budget)


class _BoundMaker:
    """A cached joined sessionmaker called with this test's connection and ``info``; the
    sessions of a ``guarded`` one refuse writes (``_scope.guard``)."""

    def __init__(self, maker: Any, connection: Any, info: dict[str, Any], *, guarded: bool) -> None:
        self._maker = maker
        self._connection = connection
        self._info = info
        self._guarded = guarded

    def __call__(self, **kwargs: Any) -> Any:
        session = self._maker(bind=self._connection, info=self._info, **kwargs)
        if self._guarded:
            guard(getattr(session, "sync_session", session))
        return session
