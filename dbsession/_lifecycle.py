"""What the sync and async factories share: settings resolved once, an engine built
lazily and exactly once, the process default, and methods callable on either the
class (the default) or an instance.
"""

from __future__ import annotations

import functools
import os
import threading
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import MethodType
from typing import Any, ClassVar, Concatenate, Generic, ParamSpec, TypeVar, cast

from sqlalchemy.engine import URL

from ._binding import Binding, normalize_isolation_level
from ._config import Settings, make_settings, mask_url, sync_twin
from ._context import Frame, innermost
from ._errors import AlreadyInitializedError
from ._retry import RetryPolicy
from ._scope import savepoint_frame

P = ParamSpec("P")
R = TypeVar("R")
B = TypeVar("B", bound="Binding[Any, Any]")
C = TypeVar("C")
F = TypeVar("F", bound="LazyFactory[Any]")


class DefaultOrSelf(Generic[F, P, R]):
    """A method that runs on the instance, or on the process default when called on the class.

    ``DbSessionFactory.create_session()`` and ``reports.create_session()`` are one
    implementation; the default is looked up at call time, never at attribute access.
    With ``no_default`` given, a call on the class does not create the default: when
    there is none it returns ``no_default()`` instead (``dispose()`` on nothing).
    With ``late=True`` the method gets ``None`` for the default and looks it up itself,
    later (a decorator looks it up at each call of the function it decorates).
    """

    def __init__(
        self,
        func: Callable[Concatenate[F, P], R],
        *,
        no_default: Callable[[], Any] | None = None,
        late: bool = False,
    ) -> None:
        self._func = func
        self._no_default = no_default
        self._late = late
        self._on_default: dict[type[Any], Callable[P, R]] = {}
        self.__doc__ = func.__doc__

    def __get__(self, instance: F | None, owner: type[Any]) -> Callable[P, R]:
        if instance is not None:
            return cast("Callable[P, R]", MethodType(self._func, instance))
        on_default = self._on_default.get(owner)
        if on_default is None:
            on_default = self._on_default[owner] = self._make_on_default(owner)
        return on_default

    def _make_on_default(self, owner: type[Any]) -> Callable[P, R]:
        """The class-level function for ``owner``, made once per class, not per access."""
        func, no_default, late = self._func, self._no_default, self._late

        @functools.wraps(func)
        def on_default(*args: P.args, **kwargs: P.kwargs) -> R:
            if late:
                return func(None, *args, **kwargs)  # type: ignore[arg-type]
            if no_default is None:
                return func(owner.default(), *args, **kwargs)
            target: F | None = owner._default
            return cast(R, no_default()) if target is None else func(target, *args, **kwargs)

        on_default.__name__ = on_default.__qualname__ = func.__name__.lstrip("_")
        return on_default


class LazyFactory(Generic[B]):
    """Base of DbSessionFactory and AsyncDbSessionFactory; ``B`` is what ``_make`` builds
    for one URL (a ``Binding``): one for the primary, one for the replica if configured.

    Subclasses set ``_asyncio`` (which default drivers a bare URL gets), their own
    ``_default`` and ``_default_lock``, and implement ``_make`` and ``_dispose_built``.
    """

    _asyncio: ClassVar[bool] = False
    _default: ClassVar[Any] = None
    _default_lock: ClassVar[threading.Lock]

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

        ``engine_options`` go to SQLAlchemy's ``create_engine`` (``create_async_engine``)
        and override dbsession's defaults (``pool_pre_ping=True``). With ``replica_url``,
        read-only scopes run on a second engine for that URL (same options), built on
        first use. Raises a ConfigurationError subclass if the URL or options cannot work.
        """
        self._adopt(
            self._settings_for(
                url, replica_url, expire_on_commit, sqlite_busy_timeout, engine_options
            )
        )

    def _adopt(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._bindings: dict[bool, B] = {}  # keyed by "is the replica"

    @classmethod
    def _settings_for(
        cls,
        url: str | URL | None,
        replica_url: str | URL | None,
        expire_on_commit: bool | None,
        sqlite_busy_timeout: float | None,
        engine_options: dict[str, Any],
    ) -> Settings:
        return make_settings(
            url,
            expire_on_commit=expire_on_commit,
            sqlite_busy_timeout=sqlite_busy_timeout,
            engine_options=engine_options,
            replica_url=replica_url,
            asyncio=cls._asyncio,
        )

    def __repr__(self) -> str:
        state = "ready" if self._bindings else "not initialised"
        return f"<{type(self).__name__} {mask_url(self._settings.url)} ({state})>"

    @property
    def url(self) -> URL:
        """The resolved URL (its repr and str mask the password)."""
        return self._settings.url

    @property
    def settings(self) -> Settings:
        """The resolved settings this factory builds from."""
        return self._settings

    @classmethod
    def global_init(
        cls: type[F],
        url: str | URL | None = None,
        *,
        replica_url: str | URL | None = None,
        expire_on_commit: bool | None = None,
        sqlite_busy_timeout: float | None = None,
        require_migrated: bool = False,
        migrations: str | os.PathLike[str] | None = None,
        **engine_options: Any,
    ) -> F:
        """Configure and build the process-wide default factory, once.

        Calling it again with the same URL and options does nothing. Raises
        AlreadyInitializedError if the default already uses another URL or other
        options (call ``dispose()`` on the class first to switch), and a
        ConfigurationError subclass if the URL or options cannot work. With
        ``require_migrated=True`` it raises SchemaNotAtHeadError, naming the
        current and the head revision, when the schema is behind the migrations
        (see ``dbsession.migrations.require_head``); ``migrations`` names the
        migrations folder or ``alembic.ini`` for that check (default: found from the
        current folder, which systemd or ``gunicorn --chdir`` may have changed).
        """
        settings = cls._settings_for(
            url, replica_url, expire_on_commit, sqlite_busy_timeout, engine_options
        )
        with cls._default_lock:
            current: F | None = cls._default
            if current is None:
                current = cls.__new__(cls)
                current._adopt(settings)
                current._build()
                cls._default = current
            elif current._settings != settings:
                raise AlreadyInitializedError(
                    "dbsession is already initialised with "
                    f"{current._settings.describe()}; cannot switch to {settings.describe()}"
                    + (" with other options" if current.url == settings.url else "")
                    + ". Call global_init() before the first use, or call "
                    f"{cls.__name__}.dispose() first to re-initialise."
                )
        if require_migrated:
            from .migrations import require_head  # Alembic is only imported when asked for

            require_head(url=sync_twin(current.url), migrations=migrations)
        return current

    @classmethod
    def default(cls: type[F]) -> F:
        """The process default factory; initialised from the environment if global_init was not."""
        current: F | None = cls._default
        return current if current is not None else cls.global_init()

    def _build(self, *, replica: bool = False) -> B:
        """What ``_make`` builds for the primary (or the replica), made on first use under
        a lock: exactly once, whoever races.

        Building never awaits, so the lock is held only by threads, never across a task
        switch. Raises ConfigurationError for ``replica=True`` without a replica_url.
        """
        built = self._bindings.get(replica)
        if built is not None:
            return built
        with self._lock:
            built = self._bindings.get(replica)
            if built is None:
                built = self._make(self._settings.for_replica() if replica else self._settings)
                self._bindings[replica] = built
            return built

    def _open_scope(
        self,
        new: Callable[..., C],
        join: Callable[[Frame], C],
        *,
        nested: bool,
        readonly: bool,
        isolation_level: str | None,
    ) -> C:
        """The one policy of ``session_scope`` and ``async_session_scope``: ``join(frame)``
        the innermost active scope of this factory as a savepoint when ``nested``, else a
        ``new`` unit of work on the right sessionmaker (the replica's when read-only and
        there is one).

        Raises UnsupportedIsolationLevelError for a level the backend does not have,
        ScopeError when a savepoint is asked to change read-only-ness or isolation.
        """
        level = normalize_isolation_level(isolation_level)
        outer = innermost(self) if nested else None
        if outer is not None:
            return join(savepoint_frame(outer, readonly=readonly, isolation_level=level))
        binding = self._build(replica=readonly and self._settings.replica_url is not None)
        maker = binding.maker(readonly=readonly, isolation_level=level)
        return new(maker, owner=self, readonly=readonly, isolation_level=level)

    def _with_retries(
        self,
        run: Callable[..., R],
        open_scope: Callable[..., Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        policy: RetryPolicy,
        readonly: bool,
        isolation_level: str | None,
    ) -> R:
        """The one body of ``run_in_transaction`` on both sides: ``run`` (``run_with_retries``
        or its async twin) calls ``fn(session, *args)`` in ``open_scope(readonly=...,
        isolation_level=...)`` scopes. Raises UnsupportedIsolationLevelError at once for a
        bad level, else what ``run`` raises."""
        level = normalize_isolation_level(isolation_level)
        return run(
            lambda: open_scope(readonly=readonly, isolation_level=level),
            functools.wraps(fn)(lambda session: fn(session, *args)),
            policy=policy,
            dialect_name=self._settings.url.get_backend_name(),
        )

    # Private hook for dbsession.testing (the pytest plugin); not public API.
    # SQLAlchemy's "Joining a Session into an External Transaction" recipe: while the
    # block runs, every session this factory makes (its scopes, create_session) is
    # bound to ``connection`` (an AsyncConnection for the async factory) with
    # join_transaction_mode="create_savepoint", so its commit releases a SAVEPOINT and
    # its rollback rolls back to it, while the connection's outer transaction (owned
    # by the caller) stays open. The factory is also its class's process default for
    # the block, so the module-level scope functions join too. Swaps and restores
    # happen under the locks; the connection itself is not thread-safe, so only the
    # test's own thread (or event loop) may use the sessions. Yields the joined Binding.
    @contextmanager
    def _joined(self, connection: Any) -> Iterator[B]:
        bound = cast(B, self._build().joined_to(connection))
        with self._lock:
            saved, self._bindings = self._bindings, {False: bound, True: bound}
        cls = type(self)
        with cls._default_lock:
            previous, cls._default = cls._default, self
        try:
            yield bound
        finally:
            with cls._default_lock:
                if cls._default is self:
                    cls._default = previous
            with self._lock:
                if self._bindings.get(False) is bound:
                    self._bindings = saved

    @abstractmethod
    def _make(self, settings: Settings) -> B:
        """Build the engine and sessionmakers; raise ConfigurationError if they cannot be."""

    def _detach(self) -> list[B]:
        """Forget what was built (returned for the caller to dispose); stop being the default."""
        with self._lock:
            bindings, self._bindings = self._bindings, {}
        cls = type(self)
        with cls._default_lock:
            if cls._default is self:
                cls._default = None
        return list(bindings.values())
