"""What the sync and async factories share: settings resolved once, an engine built
lazily and exactly once, the one scope policy (join or begin), and the process default.

The process default of each factory class lives in a ``Registry``: configured by
``global_init()``, used by the module functions (``dbsession.session_scope()`` ...),
ended by ``global_dispose()``.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Generic, TypeVar, cast

from sqlalchemy import event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.orm import Session

from ._binding import Binding, normalize_isolation_level
from ._config import ENV_VAR, Settings, Timeouts, make_settings, mask_url, sync_twin
from ._context import DIVERT_HOOKS_KEY, Hook, innermost
from ._errors import (
    AlreadyInitializedError,
    ConfigurationError,
    DatabaseBlockedError,
    NotInitializedError,
    RemovedAPIError,
)
from ._replica import refuse_for_savepoint, use_replica
from ._retry import RetryPolicy, UnitOfWorkFunction, unit_name
from ._scope import ScopeSession

logger: logging.Logger = logging.getLogger("dbsession")
_warned_embedded_default = False

R = TypeVar("R")
B = TypeVar("B", bound="Binding[Any, Any]")
C = TypeVar("C")
F = TypeVar("F", bound="LazyFactory[Any]")


class Registry(Generic[F]):
    """The process default factory of one factory class (``DbSessionFactory.registry``,
    ``AsyncDbSessionFactory.registry``): none yet (made lazily from the environment on
    first use), one, or disposed (use raises NotInitializedError).

    Test harnesses (dbsession's pytest plugin) use two public seams: ``pin(factory)``
    makes their factory the default whatever the app asks ``global_init()`` for, and
    ``block(refuse)`` refuses the default's connections while ``refuse()`` gives a reason.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self.current: F | None = None
        self._disposed = False
        self._pinned = False
        #: While ``block()`` runs: asked before the default connects (see ``_check``).
        self._refuse: Callable[[], str | None] | None = None

    def install(self, candidate: F) -> F:
        """Make ``candidate`` the default unless one with the same settings is already
        there (returned instead). Raises AlreadyInitializedError for other settings."""
        with self._lock:
            current = self.current
            if current is not None and self._pinned:
                return current
            if current is None:
                candidate._build()
                self.current, self._disposed = candidate, False
                return candidate
        if current.settings != candidate.settings:
            raise AlreadyInitializedError(
                "dbsession is already initialised with "
                f"{current.settings.describe()}; cannot switch to "
                f"{candidate.settings.describe()}"
                + (" with other options" if current.url == candidate.url else "")
                + f". Call global_init() before the first use, or call {self._name}"
                ".global_dispose() first to re-initialise."
            )
        return current

    def get(self, lazily: Callable[[], F]) -> F:
        """The default; made by ``lazily()`` on first use. Raises NotInitializedError after
        ``global_dispose()`` until ``global_init()`` is called again."""
        current = self.current
        if current is not None:
            return current
        if self._disposed:
            raise NotInitializedError(
                f"The process default {self._name} was disposed ({self._name}.global_dispose()) "
                f"and not initialised again: call {self._name}.global_init(url) before using "
                "session_scope() and the other module functions. (dbsession does not fall "
                "back to DATABASE_URL or the SQLite file after a dispose, so late work cannot "
                "land in the wrong database.)"
            )
        return lazily()

    def take(self, *, allow_lazy: bool) -> F | None:
        """Forget the default and return it for disposal; afterwards the default is made
        lazily again only if ``allow_lazy``."""
        with self._lock:
            if self._pinned:
                return None
            current, self.current = self.current, None
            self._disposed = not allow_lazy
            return current

    @contextmanager
    def pin(self, factory: F) -> Iterator[F]:
        """Make ``factory`` the process default while the block runs, whatever else asks:
        ``global_init()`` returns it (whatever URL and options it is given),
        ``global_dispose()`` leaves it alone, and the module functions use it. The
        default before the block is back afterwards. Pins nest. Yields ``factory``."""
        with self._lock:
            saved = (self.current, self._disposed, self._pinned)
            self.current, self._disposed, self._pinned = factory, False, True
        _guard_connections(self, factory)
        try:
            yield factory
        finally:
            with self._lock:
                if self.current is factory:
                    self.current, self._disposed, self._pinned = saved

    @contextmanager
    def block(self, refuse: Callable[[], str | None]) -> Iterator[None]:
        """While the block runs, ask ``refuse()`` each time the process default is about
        to open a unit of work, and at each checkout of a connection from its engine's
        pool: a string is raised as DatabaseBlockedError with that message, None lets it
        through. Building the default (``factory.engine``) is never refused: it opens
        nothing."""
        with self._lock:
            saved, self._refuse = self._refuse, refuse
        current = self.current
        if current is not None:
            _guard_connections(self, current)
        try:
            yield
        finally:
            with self._lock:
                self._refuse = saved

    def _check(self, factory: object) -> None:
        """Raise DatabaseBlockedError if ``factory`` is the default and a ``block()`` refuses
        it now (a no-op outside ``block()``)."""
        check = self._refuse
        if check is not None and self.current is factory:
            reason = check()
            if reason is not None:
                raise DatabaseBlockedError(reason)


def _guard_connections(registry: Registry[Any], factory: LazyFactory[Any]) -> None:
    """Have every pool ``factory`` built so far ask ``registry._check`` at each checkout
    (a new or a pooled connection), once per engine; ``_build`` does the same for the
    engines it builds later while ``factory`` is pinned or blocked."""
    owner = weakref.ref(factory)

    def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        current = owner()
        if current is not None:
            registry._check(current)

    for binding in list(factory._bindings.values()):
        for built in binding.engines():  # the read-only twin too, once built
            engine = getattr(built, "sync_engine", built)
            if engine not in _GUARDED:
                _GUARDED.add(engine)
                event.listen(engine, "checkout", checkout)


#: The engines whose checkouts ask their registry (see _guard_connections).
_GUARDED: weakref.WeakSet[Engine] = weakref.WeakSet()


class LazyFactory(Generic[B]):
    """Base of DbSessionFactory and AsyncDbSessionFactory; ``B`` is what ``_make`` builds
    for one URL (a ``Binding``): one for the primary, one for the replica if configured.

    Subclasses set ``_asyncio`` (which default drivers a bare URL gets) and
    ``registry`` (their process default), and implement ``_make``.
    """

    _asyncio: ClassVar[bool] = False
    #: The process default of this class: ``global_init()`` configures it; test harnesses
    #: pin and block it (``Registry.pin``, ``Registry.block``).
    registry: ClassVar[Registry[Any]]

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        replica_url: str | URL | None = None,
        expire_on_commit: bool | None = None,
        sqlite_busy_timeout: float | None = None,
        pooler: str | None = None,
        timeouts: Timeouts | None = None,
        max_replica_lag: float | None = None,
        session_class: type[Any] | None = None,
        **engine_options: Any,
    ) -> None:
        """Resolve the URL now (argument > DATABASE_URL > SQLite default); build the engine lazily.

        ``engine_options`` go to SQLAlchemy's ``create_engine`` (``create_async_engine``)
        and override dbsession's defaults (``pool_size``, ``max_overflow``, the liveness check
        that ``pool_pre_ping=True`` or ``False`` replaces). With ``replica_url``,
        read-only scopes run on a second engine for that URL (same options), built on
        first use. ``pooler`` ("transaction", "session", "none"; unset: prepared
        statements off), ``timeouts`` (a ``Timeouts``) and ``max_replica_lag`` (seconds):
        see docs/deploying.md. ``session_class``: the app's own Session class (a subclass
        of SQLAlchemy's ``Session``, e.g. ``sqlmodel.Session``; ``AsyncSession`` for the
        async factory), used for every scope with all of dbsession's guarantees. Raises a
        ConfigurationError subclass if the URL or options cannot work.
        """
        self._settings = make_settings(
            url,
            expire_on_commit=expire_on_commit,
            sqlite_busy_timeout=sqlite_busy_timeout,
            engine_options=engine_options,
            replica_url=replica_url,
            asyncio=self._asyncio,
            pooler=pooler,
            timeouts=timeouts,
            max_replica_lag=max_replica_lag,
        )
        self._session_class = self._check_session_class(session_class)
        self._lock = threading.Lock()
        self._bindings: dict[bool, B] = {}  # keyed by "is the replica"

    #: What ``session_class`` must subclass (AsyncSession for the async factory).
    _session_base: ClassVar[type[Any]] = Session

    @classmethod
    def _check_session_class(cls, session_class: type[Any] | None) -> type[Any] | None:
        """Raise ConfigurationError unless ``session_class`` is None or a Session subclass
        of the kind this factory makes."""
        base = cls._session_base
        if session_class is not None and not (
            isinstance(session_class, type) and issubclass(session_class, base)
        ):
            raise ConfigurationError(
                f"session_class={session_class!r} is not a subclass of {base.__module__}."
                f"{base.__qualname__}: pass the Session class your models use (e.g. "
                "sqlmodel.Session), or leave it out."
            )
        return session_class

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
        pooler: str | None = None,
        timeouts: Timeouts | None = None,
        max_replica_lag: float | None = None,
        migrations: str | os.PathLike[str] | None = None,
        session_class: type[Any] | None = None,
        **engine_options: Any,
    ) -> F:
        """Configure and build the process-wide default factory, once; return it.

        The module functions (``session_scope()``, ``run_in_transaction()`` ...) use it.
        Calling it again with the same URL and options returns the same factory. Raises
        AlreadyInitializedError if the default already uses another URL or other
        options (call ``global_dispose()`` first to switch), and a ConfigurationError
        subclass if the URL or options cannot work. With ``require_migrated=True`` it
        raises SchemaNotAtHeadError, naming the current and the head revision, when the
        schema is behind the migrations (see ``dbsession.migrations.require_head``);
        ``migrations`` names the migrations folder or ``alembic.ini`` for that check
        (default: found from the current folder, which systemd or ``gunicorn --chdir``
        may have changed).
        """
        candidate = cls(
            url,
            replica_url=replica_url,
            expire_on_commit=expire_on_commit,
            sqlite_busy_timeout=sqlite_busy_timeout,
            pooler=pooler,
            timeouts=timeouts,
            max_replica_lag=max_replica_lag,
            session_class=session_class,
            **engine_options,
        )
        current: F = cls.registry.install(candidate)
        if require_migrated:
            from .migrations import require_head  # Alembic is only imported when asked for

            require_head(url=sync_twin(current.url), migrations=migrations)
        return current

    @classmethod
    def _lazy_default(cls: type[F]) -> F:
        """The process default made on first use, without a ``global_init()`` call: from
        DATABASE_URL, else the embedded SQLite file, which is said once per process at
        WARNING (a forgotten ``global_init()`` in production answers "no such table")."""
        made: F = cls.global_init()
        global _warned_embedded_default
        if made.settings.source == "default" and not _warned_embedded_default:
            _warned_embedded_default = True
            logger.warning(
                "dbsession: no %s.global_init() was called and %s is not set: using the "
                "embedded SQLite file %s. Set %s, or call global_init(url) at start-up "
                "(global_init() without a URL chooses this file and says nothing).",
                cls.__name__,
                ENV_VAR,
                made.settings.url.database,
                ENV_VAR,
            )
        return made

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
        registry = type(self).registry
        if registry.current is self and (registry._pinned or registry._refuse is not None):
            _guard_connections(registry, self)
        return built

    def _open_scope(
        self,
        new: Callable[..., C],
        join: Callable[..., C],
        *,
        independent: bool,
        readonly: bool,
        isolation_level: str | None,
        timeout: float | None = None,
        replica: bool | None = None,
    ) -> C:
        """The one policy of ``session_scope`` on both sides: ``join`` the innermost scope of
        this factory visible here as a SAVEPOINT, unless ``independent``; else a ``new``
        unit of work on the right sessionmaker (the replica's when read-only and there
        is one).

        Raises UnsupportedIsolationLevelError for a level the backend does not have,
        ScopeError when a joined scope is asked to change the isolation level.
        """
        level = None if isolation_level is None else normalize_isolation_level(isolation_level)
        outer = None if independent else innermost(self)
        if outer is not None:
            refuse_for_savepoint(timeout=timeout, replica=replica)
            return join(outer, readonly=readonly, isolation_level=level)
        registry = self.registry
        if registry._refuse is not None:
            registry._check(self)
        on_replica = use_replica(
            self, self._settings, readonly=readonly, replica=replica, isolation_level=level
        )
        binding = self._build(replica=on_replica)
        maker = binding.maker(readonly=readonly, isolation_level=level, timeout=timeout)
        return new(maker, owner=self, readonly=readonly, isolation_level=level)

    def _retry_policy(self, retry: RetryPolicy | None) -> RetryPolicy | None:
        """The policy for a run_in_transaction started here: None (one attempt, no
        retry) inside a scope of this factory, whose own retry loop must rerun the
        whole unit; else ``retry`` or the default policy."""
        if innermost(self) is not None:
            return None
        return retry if retry is not None else RetryPolicy()

    @contextmanager
    def bound_to(
        self: F,
        connection: Any,
        *,
        on_commit: Callable[[list[Hook]], object] | None = None,
        on_session: Callable[[Any], object] | None = None,
    ) -> Iterator[F]:
        """While the block runs, every session this factory makes joins ``connection``'s
        transaction; yields the factory itself (an app that holds it joins too).

        ``connection`` is a ``Connection`` (an ``AsyncConnection`` for the async factory)
        in a transaction that the caller owns and ends. This is SQLAlchemy's "Joining a
        Session into an External Transaction" recipe: a unit of work's commit releases a
        SAVEPOINT and its rollback rolls back to it, and the outer transaction stays
        open. Read-only scopes still refuse writes; isolation levels are not applied
        (the transaction is already open). Nothing is committed, so the ``on_commit``
        hooks of each unit of work are passed to ``on_commit`` (default: dropped).
        ``on_session`` is called with each new session before it is handed out (to
        check who asks; if it raises, the session is closed and the error propagates).
        """
        options: dict[str, Any] = {"info": {DIVERT_HOOKS_KEY: on_commit or _drop}}
        if on_session is not None:
            options["wrap"] = functools.partial(_Checked, on_session)
        bound = cast(B, self._build().joined_to(connection, **options))
        with self._lock:
            saved, self._bindings = self._bindings, {False: bound, True: bound}
        try:
            yield self
        finally:
            with self._lock:
                if self._bindings.get(False) is bound:
                    self._bindings = saved

    @abstractmethod
    def _make(self, settings: Settings) -> B:
        """Build the engine and sessionmakers; raise ConfigurationError if they cannot be."""

    def _detach(self) -> list[B]:
        """Forget what was built (returned for the caller to dispose)."""
        with self._lock:
            bindings, self._bindings = self._bindings, {}
        return list(bindings.values())


def _drop(hooks: list[Hook]) -> None:
    """The ``on_commit`` hooks of a unit of work joined to an outer transaction: dropped."""


class _Checked:
    """A sessionmaker whose every session is shown to ``check`` before it is handed out."""

    def __init__(self, check: Callable[[Any], object], maker: Callable[..., Any]) -> None:
        self._check = check
        self._maker = maker

    def __call__(self, **kwargs: Any) -> Any:
        session = self._maker(**kwargs)
        try:
            self._check(session)
        except BaseException:
            getattr(session, "sync_session", session).close()  # never used: nothing to await
            raise
        return session


_scope_classes: dict[type[Session], type[ScopeSession]] = {}
_scope_classes_lock = threading.Lock()


def scope_session_class(base: type[Session] | None) -> type[ScopeSession]:
    """The Session class of a factory's scopes: dbsession's ``ScopeSession`` combined with
    the app's own ``base`` (``sqlmodel.Session``...), made once per class, so a scope's
    session has the app's methods (``session.exec()``) and dbsession's guarantees."""
    if base is None or base is Session:
        return ScopeSession
    if issubclass(base, ScopeSession):
        return base
    with _scope_classes_lock:
        made = _scope_classes.get(base)
        if made is None:
            made = type(
                base.__name__,
                (ScopeSession, base),
                {"__module__": base.__module__, "__doc__": base.__doc__},
            )
            _scope_classes[base] = made
        return made


def decorate(
    fn: Callable[..., Any] | None, run: Callable[..., Any], options: dict[str, Any]
) -> Any:
    """``@transactional`` and ``@transactional(...)``: wrap ``fn`` (now, or when the
    decorator is applied) so each call goes through ``run(unit, **options)``."""
    policy = options.get("retry")
    if policy is not None and not isinstance(policy, RetryPolicy):
        raise TypeError(f"retry= takes a RetryPolicy, got {type(policy).__name__}")
    normalize_isolation_level(options.get("isolation_level"))  # fail at decoration

    def wrap(function: Callable[..., Any]) -> Any:
        name = unit_name(function)
        return UnitOfWorkFunction(function, lambda unit: run(unit, name=name, **options))

    return wrap if fn is None else wrap(fn)


#: The keywords of ``run_in_transaction`` that are dbsession's, never passed to ``fn``.
RUN_OPTIONS = ("retry", "readonly", "isolation_level")


#: The 0.1 keywords of ``run_in_transaction``, now fields of ``RetryPolicy``.
REMOVED_OPTIONS = ("attempts", "base_delay", "max_delay")


def run_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take dbsession's own keywords (``RUN_OPTIONS``) out of ``kwargs`` and return them.

    Raises RemovedAPIError (a TypeError) for the 0.1 keywords (``attempts=`` ...), naming
    ``retry=``.
    """
    removed = [name for name in REMOVED_OPTIONS if name in kwargs]
    if removed:
        given = ", ".join(f"{name}={kwargs[name]!r}" for name in removed)
        raise RemovedAPIError(
            f"run_in_transaction({given}): these keywords were removed in 0.2; pass "
            f"retry=RetryPolicy({given}) instead (from dbsession import RetryPolicy)."
        )
    options = {name: kwargs.pop(name) for name in RUN_OPTIONS if name in kwargs}
    retry = options.get("retry")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise TypeError(f"retry= takes a RetryPolicy, got {type(retry).__name__}")
    return options
