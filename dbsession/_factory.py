"""DbSessionFactory: one engine and sessionmaker per connection string, built lazily and
once; and the module functions that use the process default factory."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar, overload

from sqlalchemy import MetaData, create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from ._base import Base
from ._binding import Binding
from ._config import Settings, mask_url
from ._engine import build_engine
from ._errors import RemovedAPIError
from ._lifecycle import LazyFactory, Registry, decorate, run_options, scope_session_class
from ._retry import RetryPolicy, run_with_retries, unit_name
from ._scope import Savepoint, UnitOfWork

logger: logging.Logger = logging.getLogger("dbsession")

P = ParamSpec("P")
R = TypeVar("R")
SyncBinding = Binding[Engine, sessionmaker[Session]]
Unit = Callable[Concatenate[Session, P], R]


#: The 0.1 calls on the class, and what replaced each (CHANGELOG.md, 0.2.0).
_CLASS_CALLS_REMOVED = {
    "session_scope": "dbsession.session_scope()",
    "create_session": "dbsession.create_session()",
    "run_in_transaction": "dbsession.run_in_transaction(fn, ...)",
    "transactional": "@dbsession.transactional",
    "create_all": "dbsession.default_factory().create_all()",
    "dispose": "DbSessionFactory.global_dispose()",
}


def _removed_class_call(name: str, instead: str) -> property:
    """A metaclass property: ``DbSessionFactory.<name>`` (the 0.1 class-level call) gives a
    function raising RemovedAPIError (a TypeError) naming the 0.2 spelling. Instances never
    see it (a metaclass attribute is not looked up on them), so their method calls cost
    nothing more; ``DbSessionFactory.<name>(factory, ...)`` still calls the method."""

    def get(cls: type[Any]) -> Callable[..., Any]:
        method = next(k.__dict__[name] for k in cls.__mro__ if name in k.__dict__)

        @functools.wraps(method)
        def called_on_the_class(*args: Any, **kwargs: Any) -> Any:
            if args and isinstance(args[0], cls):
                return method(*args, **kwargs)
            raise RemovedAPIError(
                f"{cls.__name__}.{name}() on the class was removed in 0.2: use {instead}, "
                f"or factory.{name}() on a factory (the one global_init() returns)."
            )

        return called_on_the_class

    return property(get)


class _RemovedClassCalls(type):
    """DbSessionFactory's metaclass: only the 0.1 class-level calls, as named errors."""


for _name, _instead in _CLASS_CALLS_REMOVED.items():
    setattr(_RemovedClassCalls, _name, _removed_class_call(_name, _instead))


class DbSessionFactory(LazyFactory[SyncBinding], metaclass=_RemovedClassCalls):
    """Owns one engine and its sessionmakers for one database URL.

    ``reports = DbSessionFactory(url)`` makes a factory for a database;
    ``DbSessionFactory.global_init(url)`` configures the process default, which the
    module functions (``dbsession.session_scope()`` ...) use. The engine is built on
    first use, exactly once, whoever races for it.

    Raises ConfigurationError subclasses when the URL or options cannot work.
    """

    registry: ClassVar[Registry[DbSessionFactory]] = Registry("DbSessionFactory")

    @classmethod
    def global_dispose(cls, *, allow_lazy: bool = False) -> None:
        """Dispose the process default factory (if any) and forget it.

        Afterwards the module functions raise NotInitializedError until
        ``global_init()`` is called again, so late work never lands in a database
        made up from the environment. ``allow_lazy=True`` (for tests) lets the next
        use initialise the default lazily from ``DATABASE_URL`` again.
        """
        factory = cls.registry.take(allow_lazy=allow_lazy)
        if factory is not None:
            factory.dispose()

    @property
    def engine(self) -> Engine:
        """The engine, built on first access."""
        return self._build().engine

    @property
    def replica_engine(self) -> Engine | None:
        """The replica's engine (built on first access), or None without a replica_url."""
        return None if self._settings.replica_url is None else self._build(replica=True).engine

    def _make(self, settings: Settings) -> SyncBinding:
        engine, make_twin = build_engine(settings, create_engine, lambda built: built)
        return Binding(
            engine,
            engine,
            sessionmaker,
            expire_on_commit=settings.expire_on_commit,
            session_options={"class_": scope_session_class(self._session_class)},
            make_twin=make_twin,
        )

    def session_scope(
        self,
        *,
        independent: bool = False,
        readonly: bool = False,
        isolation_level: str | None = None,
        nested: bool | None = None,
        timeout: float | None = None,
        replica: bool | None = None,
    ) -> AbstractContextManager[Session]:
        """Open a unit of work: a Session committed on success and rolled back on any error.

        ``with factory.session_scope() as session: ...``. The exception that ended the
        block is re-raised unchanged after the rollback; the session is always closed
        (and unusable afterwards), and ``on_commit`` hooks run after a successful commit.

        Inside an open scope of this factory, in the same thread or asyncio task, the
        new scope joins it as a SAVEPOINT: an exception rolls back to the savepoint
        only and is re-raised; the outer scope commits everything at its end.

        - ``independent=True``: a separate transaction on its own connection even inside
          another scope (an audit row that must survive the outer rollback). It can
          deadlock against the outer scope if both touch the same rows.
        - ``readonly=True``: a read-only transaction (the database refuses writes), on the replica
          if there is one; a write raises ReadOnlyError. Joined to a writing scope, it
          sees that scope's uncommitted writes and refuses writes of its own.
        - ``isolation_level``: e.g. ``"SERIALIZABLE"`` or ``"read_committed"`` for this
          scope's transaction only.
        - ``nested``: deprecated; scopes join by default (``nested=False`` is
          ``independent=True``).
        - ``timeout``: a time budget in seconds for every statement and lock wait of
          this transaction; overrunning it raises ScopeTimeoutError.
        - ``replica``: ``False`` keeps a read-only scope on the primary (to see a commit
          just made); ``True`` insists on the replica. See docs/deploying.md. A joined
          scope takes neither (ScopeError): they belong to the outer transaction.

        Raises UnsupportedIsolationLevelError for a level the backend does not have,
        ScopeError when a joined scope is asked for another isolation level,
        DatabaseUnreachableError when no connection can be opened, and
        TransactionAbortedError when the transaction was lost inside a joined scope.
        """
        return self._open_scope(
            UnitOfWork,
            Savepoint,
            independent=independent if nested is None else _independent(independent, nested),
            readonly=readonly,
            isolation_level=isolation_level,
            timeout=timeout,
            replica=replica,
        )

    @overload
    def run_in_transaction(self, fn: Unit[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R: ...
    @overload
    def run_in_transaction(  # type: ignore[overload-cannot-match]
        self,
        fn: Callable[Concatenate[Session, ...], R],
        /,
        *args: Any,
        retry: RetryPolicy,
        readonly: bool = False,
        isolation_level: str | None = None,
        **kwargs: Any,
    ) -> R: ...
    @overload
    def run_in_transaction(  # type: ignore[overload-cannot-match]
        self,
        fn: Callable[Concatenate[Session, ...], R],
        /,
        *args: Any,
        retry: RetryPolicy | None = None,
        readonly: bool,
        isolation_level: str | None = None,
        **kwargs: Any,
    ) -> R: ...
    @overload
    def run_in_transaction(  # type: ignore[overload-cannot-match]
        self,
        fn: Callable[Concatenate[Session, ...], R],
        /,
        *args: Any,
        retry: RetryPolicy | None = None,
        readonly: bool = False,
        isolation_level: str,
        **kwargs: Any,
    ) -> R: ...
    def run_in_transaction(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Run ``fn(session, *args, **kwargs)`` in a scope; retry it whole on a transient failure.

        Transient: serialization failure or deadlock (PostgreSQL 40001, 40P01), deadlock
        or lock wait timeout (MySQL/MariaDB 1213, 1205), SQLITE_BUSY, anywhere in the
        error's chain. Such a failure rolls the attempt back and, after a jittered
        exponential backoff, runs ``fn`` again (default ``RetryPolicy()``: for up to 15 s).
        Returns ``fn``'s result; other errors propagate unchanged, never retried;
        ``on_commit`` hooks run once, after the successful attempt. Inside a scope of
        this factory it joins that scope and does not retry (the outer unit must).

        The keywords ``retry`` (a RetryPolicy), ``readonly`` and ``isolation_level`` are
        dbsession's, not passed to ``fn``; ``transactional(...)`` takes them with full
        typing. Raises RetryExhaustedError (chaining the last error) when every attempt
        failed, UnsupportedIsolationLevelError for a bad level.
        """
        options = run_options(kwargs)
        return self._run(
            lambda session: fn(session, *args, **kwargs), name=unit_name(fn), **options
        )

    def _run(
        self,
        unit: Callable[[Session], R],
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        readonly: bool = False,
        isolation_level: str | None = None,
    ) -> R:
        return run_with_retries(
            lambda: self.session_scope(readonly=readonly, isolation_level=isolation_level),
            unit,
            policy=self._retry_policy(retry),
            dialect_name=self._settings.url.get_backend_name(),
            name=name,
        )

    @overload
    def transactional(self, fn: Unit[P, R], /) -> Callable[P, R]: ...
    @overload
    def transactional(
        self,
        /,
        *,
        retry: RetryPolicy | None = None,
        readonly: bool = False,
        isolation_level: str | None = None,
    ) -> Callable[[Unit[P, R]], Callable[P, R]]: ...
    def transactional(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        retry: RetryPolicy | None = None,
        readonly: bool = False,
        isolation_level: str | None = None,
    ) -> Any:
        """Decorator: ``fn(session, *args, **kwargs)`` becomes ``fn(*args, **kwargs)``, each
        call run by ``run_in_transaction`` with these options. Use it bare
        (``@factory.transactional``) or with options (``@factory.transactional(retry=
        RetryPolicy(attempts=10))``), on functions and on methods (``self`` first, then
        the session). Raises TypeError for a ``retry`` that is not a RetryPolicy and
        UnsupportedIsolationLevelError for a bad level, at decoration."""
        options = {"retry": retry, "readonly": readonly, "isolation_level": isolation_level}
        return decorate(fn, self._run, options)

    def create_session(self) -> Session:
        """Return a new Session that the caller commits, rolls back and closes itself."""
        return self._build().maker()()

    def create_all(self, metadata: MetaData | None = None) -> None:
        """Create the missing tables of ``metadata`` (default: ``dbsession.Base.metadata``).

        A quick-start convenience; an app with migrations runs Alembic instead.
        """
        (metadata or Base.metadata).create_all(self._build().engine)

    def dispose(self) -> None:
        """Close the pool's connections; the next use builds a new engine."""
        for binding in self._detach():
            for engine in binding.engines():
                engine.dispose()
            logger.debug("dbsession: engine disposed for %s", mask_url(binding.engine.url))


def _independent(independent: bool, nested: bool | None) -> bool:
    """Map the deprecated ``nested=`` onto ``independent=`` (with a warning)."""
    if nested is None:
        return independent
    warnings.warn(
        "session_scope(nested=...) is deprecated: a scope opened inside another one joins "
        "it as a SAVEPOINT by default; pass independent=True for a separate transaction.",
        DeprecationWarning,
        stacklevel=3,
    )
    return independent or not nested


def default_factory() -> DbSessionFactory:
    """The process default factory: the one ``global_init()`` made, else one made now from
    ``DATABASE_URL`` (or the embedded SQLite file). Raises NotInitializedError after
    ``DbSessionFactory.global_dispose()``, ConfigurationError for a bad DATABASE_URL."""
    return DbSessionFactory.registry.get(DbSessionFactory._lazy_default)


def session_scope(
    *,
    independent: bool = False,
    readonly: bool = False,
    isolation_level: str | None = None,
    nested: bool | None = None,
    timeout: float | None = None,
    replica: bool | None = None,
) -> AbstractContextManager[Session]:
    """Open a unit of work on the process default factory (see DbSessionFactory.session_scope).

    Raises what DbSessionFactory.session_scope raises, and NotInitializedError after
    ``DbSessionFactory.global_dispose()``.
    """
    return default_factory().session_scope(
        independent=independent if nested is None else _independent(independent, nested),
        readonly=readonly,
        isolation_level=isolation_level,
        timeout=timeout,
        replica=replica,
    )


@overload
def run_in_transaction(fn: Unit[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R: ...
@overload
def run_in_transaction(  # type: ignore[overload-cannot-match]
    fn: Callable[Concatenate[Session, ...], R],
    /,
    *args: Any,
    retry: RetryPolicy,
    readonly: bool = False,
    isolation_level: str | None = None,
    **kwargs: Any,
) -> R: ...
@overload
def run_in_transaction(  # type: ignore[overload-cannot-match]
    fn: Callable[Concatenate[Session, ...], R],
    /,
    *args: Any,
    retry: RetryPolicy | None = None,
    readonly: bool,
    isolation_level: str | None = None,
    **kwargs: Any,
) -> R: ...
@overload
def run_in_transaction(  # type: ignore[overload-cannot-match]
    fn: Callable[Concatenate[Session, ...], R],
    /,
    *args: Any,
    retry: RetryPolicy | None = None,
    readonly: bool = False,
    isolation_level: str,
    **kwargs: Any,
) -> R: ...
def run_in_transaction(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """Run ``fn(session, *args, **kwargs)`` in a unit of work on the process default factory,
    retried whole on transient failures (see DbSessionFactory.run_in_transaction)."""
    return default_factory().run_in_transaction(fn, *args, **kwargs)


@overload
def transactional(fn: Unit[P, R], /) -> Callable[P, R]: ...
@overload
def transactional(
    *,
    retry: RetryPolicy | None = None,
    readonly: bool = False,
    isolation_level: str | None = None,
) -> Callable[[Unit[P, R]], Callable[P, R]]: ...
def transactional(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    retry: RetryPolicy | None = None,
    readonly: bool = False,
    isolation_level: str | None = None,
) -> Any:
    """``@transactional`` / ``@transactional(retry=..., readonly=..., isolation_level=...)``
    on the process default factory, looked up at each call of the decorated function
    (see DbSessionFactory.transactional)."""
    options = {"retry": retry, "readonly": readonly, "isolation_level": isolation_level}
    return decorate(fn, lambda unit, **kw: default_factory()._run(unit, **kw), options)


def create_session() -> Session:
    """Return a new Session of the process default factory that the caller manages."""
    return default_factory().create_session()
