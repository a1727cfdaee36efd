"""DbSessionFactory: one engine and sessionmaker per connection string, built lazily and once."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import MethodType
from typing import Any, ClassVar, Concatenate, Generic, ParamSpec, TypeVar, cast

from sqlalchemy import MetaData
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from ._base import Base
from ._binding import Binding, normalize_isolation_level
from ._config import Settings, make_settings, mask_url
from ._context import innermost
from ._engine import make_engine
from ._errors import AlreadyInitializedError
from ._retry import (
    DEFAULT_ATTEMPTS,
    DEFAULT_BASE_DELAY,
    DEFAULT_MAX_DELAY,
    RetryPolicy,
    TransactionalDecorator,
    retry_decorator,
    run_with_retries,
)
from ._scope import savepoint, unit_of_work

logger = logging.getLogger("dbsession")

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class _DefaultOrSelf(Generic[P, R]):
    """A method that runs on the instance, or on the process default when called on the class.

    ``DbSessionFactory.create_session()`` and ``reports.create_session()`` are one
    implementation; the default is looked up at call time, never at attribute access.
    With ``late=True`` the method gets ``None`` for the default and looks it up itself,
    later (a decorator looks it up at each call of the function it decorates).
    """

    def __init__(
        self,
        func: Callable[Concatenate[DbSessionFactory, P], R],
        *,
        create: bool = True,
        late: bool = False,
    ) -> None:
        self._func = func
        self.__doc__ = func.__doc__

        @functools.wraps(func)
        def on_default(*args: P.args, **kwargs: P.kwargs) -> R:
            if late:
                return func(None, *args, **kwargs)  # type: ignore[arg-type]
            target = DbSessionFactory.default() if create else DbSessionFactory._default
            if target is None:
                return None  # type: ignore[return-value]  # dispose() with nothing to dispose
            return func(target, *args, **kwargs)

        on_default.__name__ = on_default.__qualname__ = func.__name__.lstrip("_")
        self._on_default = on_default

    def __get__(self, instance: DbSessionFactory | None, owner: type[Any]) -> Callable[P, R]:
        if instance is None:
            return self._on_default
        return cast("Callable[P, R]", MethodType(self._func, instance))


class DbSessionFactory:
    """Owns one engine and its sessionmakers for one database URL.

    The process default is configured with :meth:`global_init` (or lazily, on first
    use, from ``DATABASE_URL`` or the embedded SQLite file) and used through the class
    itself: ``DbSessionFactory.session_scope()``. Further databases get instances:
    ``reports = DbSessionFactory(url)``, which have the same methods.

    Raises ConfigurationError subclasses when the URL or options cannot work.
    """

    _default: ClassVar[DbSessionFactory | None] = None
    _default_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        replica_url: str | URL | None = None,
        expire_on_commit: bool | None = None,
        sqlite_busy_timeout: float | None = None,
        **engine_options: Any,
    ) -> None:
        """Resolve the URL now (argument > DATABASE_URL > SQLite default); build the engine lazily.

        ``engine_options`` go to :func:`sqlalchemy.create_engine` and override
        dbsession's defaults (``pool_pre_ping=True``). With ``replica_url``, read-only
        scopes run on a second engine for that URL (same options), built on first use.
        """
        self._settings = make_settings(
            url,
            expire_on_commit=expire_on_commit,
            sqlite_busy_timeout=sqlite_busy_timeout,
            engine_options=engine_options,
            replica_url=replica_url,
        )
        self._lock = threading.Lock()
        self._bindings: dict[bool, Binding] = {}  # keyed by "is the replica"

    def __repr__(self) -> str:
        state = "ready" if self._bindings else "not initialised"
        return f"<DbSessionFactory {mask_url(self._settings.url)} ({state})>"

    @property
    def url(self) -> URL:
        """The resolved URL (its repr and str mask the password)."""
        return self._settings.url

    @property
    def settings(self) -> Settings:
        """The resolved settings this factory builds from."""
        return self._settings

    @property
    def engine(self) -> Engine:
        """The engine, built on first access."""
        return self._build().engine

    @property
    def replica_engine(self) -> Engine | None:
        """The replica's engine (built on first access), or None without a replica_url."""
        return None if self._settings.replica_url is None else self._build(replica=True).engine

    @classmethod
    def global_init(
        cls,
        url: str | URL | None = None,
        *,
        replica_url: str | URL | None = None,
        expire_on_commit: bool | None = None,
        sqlite_busy_timeout: float | None = None,
        require_migrated: bool = False,
        **engine_options: Any,
    ) -> DbSessionFactory:
        """Configure and build the process-wide default factory, once.

        Calling it again with the same URL and options does nothing. Raises
        AlreadyInitializedError if the default already uses another URL or other
        options (call ``DbSessionFactory.dispose()`` first to switch), and a
        ConfigurationError subclass if the URL or options cannot work. With
        ``require_migrated=True`` it raises SchemaNotAtHeadError, naming the
        current and the head revision, when the schema is behind the migrations
        (see ``dbsession.migrations.require_head``).
        """
        settings = make_settings(
            url,
            expire_on_commit=expire_on_commit,
            sqlite_busy_timeout=sqlite_busy_timeout,
            engine_options=engine_options,
            replica_url=replica_url,
        )
        with cls._default_lock:
            current = cls._default
            if current is None:
                current = cls._from_settings(settings)
                current._build()
                cls._default = current
            elif current._settings != settings:
                raise AlreadyInitializedError(
                    "dbsession is already initialised with "
                    f"{current._settings.describe()}; cannot switch to {settings.describe()}"
                    + (" with other options" if current.url == settings.url else "")
                    + ". Call global_init() before the first session_scope(), or call "
                    "DbSessionFactory.dispose() first to re-initialise."
                )
        if require_migrated:
            from .migrations import require_head  # Alembic is only imported when asked for

            require_head(url=current.url)
        return current

    @classmethod
    def default(cls) -> DbSessionFactory:
        """The process default factory; initialised from the environment if global_init was not."""
        current = cls._default
        return current if current is not None else cls.global_init()

    @classmethod
    def _from_settings(cls, settings: Settings) -> DbSessionFactory:
        factory = cls.__new__(cls)
        factory._settings = settings
        factory._lock = threading.Lock()
        factory._bindings = {}
        return factory

    def _build(self, *, replica: bool = False) -> Binding:
        built = self._bindings.get(replica)
        if built is not None:
            return built
        with self._lock:
            built = self._bindings.get(replica)
            if built is None:
                settings = self._settings.for_replica() if replica else self._settings
                engine = make_engine(settings)
                built = Binding(engine, expire_on_commit=settings.expire_on_commit)
                self._bindings[replica] = built
            return built

    def _session_scope(
        self, *, nested: bool = False, readonly: bool = False, isolation_level: str | None = None
    ) -> AbstractContextManager[Session]:
        """Open a unit of work: a fresh Session committed on success and rolled back on any error.

        ``with DbSessionFactory.session_scope() as session: ...``. The exception that
        ended the block is re-raised unchanged after the rollback; the session is
        always closed, and ``on_commit`` hooks run after a successful commit.

        - ``nested=True``: inside an active scope of this factory (same thread or
          asyncio task, at the time of the call), join its session as a SAVEPOINT;
          an exception rolls back to the savepoint only. Elsewhere, a normal scope.
        - ``readonly=True``: a read-only transaction, ended by a rollback, on the
          replica if there is one; a write raises ReadOnlyError.
        - ``isolation_level``: e.g. ``"SERIALIZABLE"`` or ``"read_committed"`` for
          this scope's transaction only.

        Raises UnsupportedIsolationLevelError for a level the backend does not have,
        ScopeError when a savepoint is asked to change read-only-ness or isolation,
        DatabaseUnreachableError when no connection can be opened.
        """
        level = normalize_isolation_level(isolation_level)
        outer = innermost(self) if nested else None
        if outer is not None:
            return savepoint(outer, readonly=readonly, isolation_level=level)
        binding = self._build(replica=readonly and self._settings.replica_url is not None)
        maker = binding.maker(readonly=readonly, isolation_level=level)
        return unit_of_work(maker, owner=self, readonly=readonly, isolation_level=level)

    def _run_in_transaction(
        self,
        fn: Callable[..., T],
        *args: Any,
        attempts: int = DEFAULT_ATTEMPTS,
        base_delay: float = DEFAULT_BASE_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        readonly: bool = False,
        isolation_level: str | None = None,
    ) -> T:
        """Run ``fn(session, *args)`` in a fresh scope; retry it whole on a transient failure.

        Transient: serialization failure or deadlock (PostgreSQL 40001, 40P01), deadlock
        or lock wait timeout (MySQL/MariaDB 1213, 1205), SQLITE_BUSY. Such a failure
        rolls the attempt back and, after a jittered exponential backoff (see
        RetryPolicy), runs ``fn`` again, up to ``attempts`` times in all. Returns
        ``fn``'s result. Other errors propagate unchanged and are never retried;
        ``on_commit`` hooks run once, after the successful attempt. Each retry is
        logged at INFO. Raises RetryExhaustedError (chaining the last error) when
        every attempt failed, ConfigurationError for a bad attempts or delay.
        """
        policy = RetryPolicy(attempts, base_delay, max_delay)
        level = normalize_isolation_level(isolation_level)

        def open_scope() -> AbstractContextManager[Session]:
            return self._session_scope(readonly=readonly, isolation_level=level)

        return run_with_retries(
            open_scope,
            functools.wraps(fn)(lambda session: fn(session, *args)),
            policy=policy,
            dialect_name=self._settings.url.get_backend_name(),
        )

    def _transactional(
        self,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        base_delay: float = DEFAULT_BASE_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        readonly: bool = False,
        isolation_level: str | None = None,
    ) -> TransactionalDecorator:
        """Decorator: ``@transactional()`` on ``def f(session, ...)`` makes ``f(...)`` run
        through run_in_transaction with these options (the factory is looked up at each call).

        Raises what run_in_transaction raises, when the decorated function is called.
        """
        RetryPolicy(attempts, base_delay, max_delay)  # bad options fail at decoration
        target = self

        def run(fn: Callable[[Session], Any]) -> Any:
            factory = target if target is not None else DbSessionFactory.default()
            return factory._run_in_transaction(
                fn,
                attempts=attempts,
                base_delay=base_delay,
                max_delay=max_delay,
                readonly=readonly,
                isolation_level=isolation_level,
            )

        return retry_decorator(run)

    def _create_session(self) -> Session:
        """Return a new Session that the caller commits, rolls back and closes itself."""
        return self._build().maker()()

    def _get_engine(self) -> Engine:
        """Return the engine, building it on first use."""
        return self._build().engine

    def _create_all(self, metadata: MetaData | None = None) -> None:
        """Create the missing tables of ``metadata`` (default: ``dbsession.Base.metadata``).

        A quick-start convenience; an app with migrations runs Alembic instead.
        """
        (metadata or Base.metadata).create_all(self._build().engine)

    def _dispose(self) -> None:
        """Close the pool's connections; the next use builds a new engine.

        On the class, ``DbSessionFactory.dispose()`` also forgets the process default,
        so ``global_init()`` may be called again with another URL.
        """
        with self._lock:
            bindings, self._bindings = self._bindings, {}
        for binding in bindings.values():
            binding.engine.dispose()
            logger.debug("dbsession: engine disposed for %s", mask_url(binding.engine.url))
        with DbSessionFactory._default_lock:
            if DbSessionFactory._default is self:
                DbSessionFactory._default = None

    # Private hook for dbsession.testing (the pytest plugin); not public API.
    # SQLAlchemy's "Joining a Session into an External Transaction" recipe: while the
    # block runs, every session this factory makes (session_scope, create_session) is
    # bound to ``connection`` with join_transaction_mode="create_savepoint", so its
    # commit releases a SAVEPOINT and its rollback rolls back to it, while the
    # connection's outer transaction (owned by the caller) stays open. The factory is
    # also the process default for the block, so the module-level session_scope()
    # joins too. Swaps and restores happen under the locks; the connection itself is
    # not thread-safe, so only the test's own thread may use the sessions.
    @contextmanager
    def _joined(self, connection: Connection) -> Iterator[sessionmaker[Session]]:
        bound = self._build().joined_to(connection)
        with self._lock:
            saved, self._bindings = self._bindings, {False: bound, True: bound}
        with DbSessionFactory._default_lock:
            previous, DbSessionFactory._default = DbSessionFactory._default, self
        try:
            yield bound.maker()
        finally:
            with DbSessionFactory._default_lock:
                if DbSessionFactory._default is self:
                    DbSessionFactory._default = previous
            with self._lock:
                if self._bindings.get(False) is bound:
                    self._bindings = saved

    session_scope = _DefaultOrSelf(_session_scope)
    run_in_transaction = _DefaultOrSelf(_run_in_transaction)
    transactional = _DefaultOrSelf(_transactional, late=True)
    create_session = _DefaultOrSelf(_create_session)
    get_engine = _DefaultOrSelf(_get_engine)
    create_all = _DefaultOrSelf(_create_all)
    dispose = _DefaultOrSelf(_dispose, create=False)


def session_scope(
    *, nested: bool = False, readonly: bool = False, isolation_level: str | None = None
) -> AbstractContextManager[Session]:
    """Open a unit of work on the process default factory; see DbSessionFactory.session_scope."""
    return DbSessionFactory.default()._session_scope(
        nested=nested, readonly=readonly, isolation_level=isolation_level
    )


#: ``run_in_transaction(fn, *args, attempts=5, ...)`` on the process default, looked up at
#: each call; see DbSessionFactory.run_in_transaction.
run_in_transaction = DbSessionFactory.run_in_transaction

#: ``@transactional(attempts=5, ...)`` on the process default, looked up at each call of the
#: decorated function; see DbSessionFactory.transactional.
transactional = DbSessionFactory.transactional


def create_session() -> Session:
    """Return a new Session of the process default factory that the caller manages."""
    return DbSessionFactory.default()._create_session()
