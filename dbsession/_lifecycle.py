"""What the sync and async factories share: settings resolved once, an engine built
lazily and exactly once, the process default, and methods callable on either the
class (the default) or an instance.
"""

from __future__ import annotations

import functools
import threading
from abc import abstractmethod
from collections.abc import Callable
from types import MethodType
from typing import Any, ClassVar, Concatenate, Generic, ParamSpec, TypeVar, cast

from sqlalchemy.engine import URL

from ._config import Settings, make_settings, mask_url
from ._errors import AlreadyInitializedError

P = ParamSpec("P")
R = TypeVar("R")
B = TypeVar("B")
F = TypeVar("F", bound="LazyFactory[Any]")


class DefaultOrSelf(Generic[F, P, R]):
    """A method that runs on the instance, or on the process default when called on the class.

    ``DbSessionFactory.create_session()`` and ``reports.create_session()`` are one
    implementation; the default is looked up at call time, never at attribute access.
    With ``no_default`` given, a call on the class does not create the default: when
    there is none it returns ``no_default()`` instead (``dispose()`` on nothing).
    """

    def __init__(
        self,
        func: Callable[Concatenate[F, P], R],
        *,
        no_default: Callable[[], R] | None = None,
    ) -> None:
        self._func = func
        self._no_default = no_default
        self.__doc__ = func.__doc__

    def __get__(self, instance: F | None, owner: type[F]) -> Callable[P, R]:
        if instance is not None:
            return cast("Callable[P, R]", MethodType(self._func, instance))
        func, no_default = self._func, self._no_default

        @functools.wraps(func)
        def on_default(*args: P.args, **kwargs: P.kwargs) -> R:
            if no_default is None:
                return func(owner.default(), *args, **kwargs)
            target: F | None = owner._default
            return no_default() if target is None else func(target, *args, **kwargs)

        return on_default


class LazyFactory(Generic[B]):
    """Base of DbSessionFactory and AsyncDbSessionFactory; ``B`` is what ``_make`` builds.

    Subclasses set ``_asyncio`` (which default drivers a bare URL gets), their own
    ``_default`` and ``_default_lock``, and implement ``_make``.
    """

    _asyncio: ClassVar[bool] = False
    _default: ClassVar[Any] = None
    _default_lock: ClassVar[threading.Lock]

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        expire_on_commit: bool | None = None,
        sqlite_busy_timeout: float | None = None,
        **engine_options: Any,
    ) -> None:
        """Resolve the URL now (argument > DATABASE_URL > SQLite default); build the engine lazily.

        ``engine_options`` go to SQLAlchemy's ``create_engine`` (``create_async_engine``)
        and override dbsession's defaults (``pool_pre_ping=True``). Raises a
        ConfigurationError subclass if the URL or options cannot work.
        """
        self._adopt(self._settings_for(url, expire_on_commit, sqlite_busy_timeout, engine_options))

    def _adopt(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._built: B | None = None

    @classmethod
    def _settings_for(
        cls,
        url: str | URL | None,
        expire_on_commit: bool | None,
        sqlite_busy_timeout: float | None,
        engine_options: dict[str, Any],
    ) -> Settings:
        return make_settings(
            url,
            expire_on_commit=expire_on_commit,
            sqlite_busy_timeout=sqlite_busy_timeout,
            engine_options=engine_options,
            asyncio=cls._asyncio,
        )

    def __repr__(self) -> str:
        state = "ready" if self._built is not None else "not initialised"
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
        expire_on_commit: bool | None = None,
        sqlite_busy_timeout: float | None = None,
        **engine_options: Any,
    ) -> F:
        """Configure and build the process-wide default factory, once.

        Calling it again with the same URL and options does nothing. Raises
        AlreadyInitializedError if the default already uses another URL or other
        options (call ``dispose()`` on the class first to switch), and a
        ConfigurationError subclass if the URL or options cannot work.
        """
        settings = cls._settings_for(url, expire_on_commit, sqlite_busy_timeout, engine_options)
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
        return current

    @classmethod
    def default(cls: type[F]) -> F:
        """The process default factory; initialised from the environment if global_init was not."""
        current: F | None = cls._default
        return current if current is not None else cls.global_init()

    def _build(self) -> B:
        """What ``_make`` builds, made on first use under a lock: exactly once, whoever races.

        Building never awaits, so the lock is held only by threads, never across a task switch.
        """
        built = self._built
        if built is not None:
            return built
        with self._lock:
            if self._built is None:
                self._built = self._make(self._settings)
            return self._built

    @abstractmethod
    def _make(self, settings: Settings) -> B:
        """Build the engine and sessionmakers; raise ConfigurationError if they cannot be."""

    def _detach(self) -> B | None:
        """Forget what was built (returned for the caller to dispose); stop being the default."""
        with self._lock:
            built, self._built = self._built, None
        cls = type(self)
        with cls._default_lock:
            if cls._default is self:
                cls._default = None
        return built
