"""DbSessionFactory: one engine and sessionmaker per connection string, built lazily and once."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from types import MethodType
from typing import Any, ClassVar, Concatenate, Generic, ParamSpec, TypeVar, cast

from sqlalchemy import MetaData
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from ._base import Base
from ._config import Settings, make_settings, mask_url
from ._engine import SQLITE_BEGIN_OPTION, make_engine
from ._errors import AlreadyInitializedError
from ._scope import unit_of_work

logger = logging.getLogger("dbsession")

P = ParamSpec("P")
R = TypeVar("R")


class _DefaultOrSelf(Generic[P, R]):
    """A method that runs on the instance, or on the process default when called on the class.

    ``DbSessionFactory.create_session()`` and ``reports.create_session()`` are one
    implementation; the default is looked up at call time, never at attribute access.
    """

    def __init__(
        self, func: Callable[Concatenate[DbSessionFactory, P], R], *, create: bool = True
    ) -> None:
        self._func = func
        self.__doc__ = func.__doc__

        @functools.wraps(func)
        def on_default(*args: P.args, **kwargs: P.kwargs) -> R:
            target = DbSessionFactory.default() if create else DbSessionFactory._default
            if target is None:
                return None  # type: ignore[return-value]  # dispose() with nothing to dispose
            return func(target, *args, **kwargs)

        self._on_default = on_default

    def __get__(self, instance: DbSessionFactory | None, owner: type[Any]) -> Callable[P, R]:
        if instance is None:
            return self._on_default
        return cast("Callable[P, R]", MethodType(self._func, instance))


@dataclass(frozen=True)
class _Built:
    engine: Engine
    writer: sessionmaker[Session]
    reader: sessionmaker[Session]


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
        expire_on_commit: bool | None = None,
        sqlite_busy_timeout: float | None = None,
        **engine_options: Any,
    ) -> None:
        """Resolve the URL now (argument > DATABASE_URL > SQLite default); build the engine lazily.

        ``engine_options`` go to :func:`sqlalchemy.create_engine` and override
        dbsession's defaults (``pool_pre_ping=True``).
        """
        self._settings = make_settings(
            url,
            expire_on_commit=expire_on_commit,
            sqlite_busy_timeout=sqlite_busy_timeout,
            engine_options=engine_options,
        )
        self._lock = threading.Lock()
        self._built: _Built | None = None

    def __repr__(self) -> str:
        state = "ready" if self._built is not None else "not initialised"
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

    @classmethod
    def global_init(
        cls,
        url: str | URL | None = None,
        *,
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
        factory._built = None
        return factory

    def _build(self) -> _Built:
        built = self._built
        if built is not None:
            return built
        with self._lock:
            if self._built is None:
                engine = make_engine(self._settings)
                immediate = engine.execution_options(**{SQLITE_BEGIN_OPTION: "BEGIN IMMEDIATE"})
                expire = self._settings.expire_on_commit
                writer = sessionmaker(
                    bind=immediate if _is_sqlite(engine) else engine, expire_on_commit=expire
                )
                reader = sessionmaker(bind=engine, expire_on_commit=expire)
                self._built = _Built(engine, writer, reader)
            return self._built

    def _session_scope(self) -> AbstractContextManager[Session]:
        """Open a unit of work: a fresh Session committed on success and rolled back on any error.

        ``with DbSessionFactory.session_scope() as session: ...``. The exception that
        ended the block is re-raised unchanged after the rollback; the session is
        always closed. Raises DatabaseUnreachableError when no connection can be opened.
        """
        return unit_of_work(self._build().writer)

    def _create_session(self) -> Session:
        """Return a new Session that the caller commits, rolls back and closes itself."""
        return self._build().writer()

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
            built, self._built = self._built, None
        if built is not None:
            built.engine.dispose()
            logger.debug("dbsession: engine disposed for %s", self._settings.describe())
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
        built = self._build()
        joined = sessionmaker(
            bind=connection,
            join_transaction_mode="create_savepoint",
            expire_on_commit=self._settings.expire_on_commit,
        )
        bound = replace(built, writer=joined, reader=joined)
        with self._lock:
            self._built = bound
        with DbSessionFactory._default_lock:
            previous, DbSessionFactory._default = DbSessionFactory._default, self
        try:
            yield joined
        finally:
            with DbSessionFactory._default_lock:
                if DbSessionFactory._default is self:
                    DbSessionFactory._default = previous
            with self._lock:
                if self._built is bound:
                    self._built = built

    session_scope = _DefaultOrSelf(_session_scope)
    create_session = _DefaultOrSelf(_create_session)
    get_engine = _DefaultOrSelf(_get_engine)
    create_all = _DefaultOrSelf(_create_all)
    dispose = _DefaultOrSelf(_dispose, create=False)


def _is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def session_scope() -> AbstractContextManager[Session]:
    """Open a unit of work on the process default factory; see DbSessionFactory.session_scope."""
    return DbSessionFactory.default()._session_scope()


def create_session() -> Session:
    """Return a new Session of the process default factory that the caller manages."""
    return DbSessionFactory.default()._create_session()
