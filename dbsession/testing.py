"""The pytest plugin's implementation: the test URL, the plugin's factories, the gate's
check, the rolled-back sessions.

The plugin itself (options, mark, hooks, the fixtures pytest lists) is the top-level
module ``pytest_dbsession``, registered through the ``pytest11`` entry point; it imports
only pytest, and imports this module (and so SQLAlchemy) when dbsession is imported during
the run or a test first uses a fixture. ``import dbsession`` never imports this module.

This module is no plugin of its own: naming it to pytest (``-p dbsession.testing``,
``pytest_plugins = ["dbsession.testing"]``), as one could when it was the plugin, loads
``pytest_dbsession`` (see ``pytest_plugins`` below), which is what ``-p dbsession`` does.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from pytest_dbsession import DEFAULT_METADATA, SCHEMA_CHOICES, URL_ENV, Gate

from ._config import async_twin, mask_url, resolve_url, sync_twin
from ._context import DIVERT_HOOKS_KEY, Hook
from ._errors import (
    DatabaseBlockedError,
    DbSessionError,
    MigrationError,
    MigrationsNotFoundError,
    SharedConnectionError,
)
from ._factory import DbSessionFactory
from ._lifecycle import LazyFactory

if TYPE_CHECKING:  # the async side is imported only when its fixtures are used
    from alembic.config import Config
    from sqlalchemy.ext.asyncio import AsyncSession

    from .asyncio import AsyncDbSessionFactory

#: Naming this module to pytest as a plugin loads the plugin's entry module instead.
pytest_plugins: list[str] = ["pytest_dbsession"]


def _setting(config: pytest.Config, name: str) -> str | None:
    value = config.getoption(name) or config.getini(name)
    return str(value) if value else None


# ---------------------------------------------------------------------------------------
# The run's state: the test URL, the plugin's factories, and whether the database is open.


class _Gated:
    """Mixin of the plugin's factories: they build nothing, and so open no connection,
    unless the running test asked for the database (or the catch is off)."""

    _test_run: _Run

    def _build(self, *, replica: bool = False) -> Any:
        gate = self._test_run.gate
        if not gate.open:
            raise DatabaseBlockedError(
                f"{gate.test or 'Code outside any test'} used the database without "
                "asking for it: the dbsession plugin refuses the process default factory "
                "there, so nothing can reach the app's own database. Give the test the "
                "db_session fixture (async_db_session for async code), or mark it "
                "@pytest.mark.dbsession to commit for real to the test database; "
                "dbsession_block = false in the pytest ini settings turns this check off."
            )
        return super()._build(replica=replica)  # type: ignore[misc]


class _TestFactory(_Gated, DbSessionFactory):
    """The plugin's DbSessionFactory on the test database."""


class _Run:
    """What the plugin keeps for one run (one xdist worker): the URL, its factories, the
    process defaults it pinned; ``gate`` tells which test runs now and whether it asked
    for the database. Made, and with the catch on the factory pinned, when dbsession is
    imported during the run (``pytest_dbsession.dbsession_imported``)."""

    def __init__(self, config: pytest.Config, gate: Gate) -> None:
        self.gate = gate
        self.block = gate.block
        self.worker = os.environ.get("PYTEST_XDIST_WORKER")
        self._tmp: str | None = None
        self._stack = ExitStack()
        self.connections = _Connections()
        self.url, self.created = self._choose_url(config)
        self.factory = _TestFactory(sync_twin(self.url))
        self.factory._test_run = self
        self.async_factory: AsyncDbSessionFactory | None = None
        if self.block:
            self._stack.enter_context(
                DbSessionFactory._registry.replaced_by(self.factory, pinned=True)
            )

    def _choose_url(self, config: pytest.Config) -> tuple[URL, bool]:
        """The test URL, and whether the plugin must create (and drop) that database."""
        given = _given_url(config)
        if not given:
            self._tmp = tempfile.mkdtemp(prefix="dbsession-")
            return URL.create("sqlite", database=str(Path(self._tmp) / "test.db")), False
        url = resolve_url(given)[0]
        if self.worker is None:
            return url, False
        if url.get_backend_name() == "sqlite":
            path = Path(url.database or "")
            if not url.database or url.database.startswith("file:") or url.database == ":memory:":
                return url, False
            return url.set(
                database=str(path.with_name(f"{path.stem}_{self.worker}{path.suffix}"))
            ), False
        run = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")[:8]
        return url.set(database=f"{url.database}_{run}_{self.worker}"), True

    def async_default(self) -> AsyncDbSessionFactory:
        """The plugin's AsyncDbSessionFactory (made, and pinned as the default, on first use)."""
        if self.async_factory is None:
            from .asyncio import AsyncDbSessionFactory

            class _AsyncTestFactory(_Gated, AsyncDbSessionFactory):
                """The plugin's AsyncDbSessionFactory on the test database."""

            made = _AsyncTestFactory(async_twin(self.url))
            made._test_run = self
            self.async_factory = made
            if self.block:
                registry = AsyncDbSessionFactory._registry
                self._stack.enter_context(registry.replaced_by(made, pinned=True))
        return self.async_factory

    def close(self) -> None:
        """Unpin the defaults, dispose the sync engine and remove the temporary folder."""
        self._stack.close()
        self.factory.dispose()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _given_url(config: pytest.Config) -> str | None:
    """--dbsession-url (also before the command line is fully parsed), else DBSESSION_TEST_URL."""
    early = getattr(config, "known_args_namespace", None)
    given = config.getoption("dbsession_url", None) or getattr(early, "dbsession_url", None)
    return str(given) if given else os.environ.get(URL_ENV)


# ---------------------------------------------------------------------------------------
# The database: its URL (one per xdist worker), its schema, its factories.


def _database_url(run: _Run, pytestconfig: pytest.Config) -> Iterator[URL]:
    """The ``dbsession_url`` fixture: the run's URL; under pytest-xdist a server database
    of the worker's own is created here and dropped at the end."""
    __tracebackhide__ = True
    if not run.created:
        yield run.url
        if run.worker is not None and run.url.get_backend_name() == "sqlite" and run.url.database:
            run.factory.dispose()
            Path(run.url.database).unlink(missing_ok=True)
        return
    given = resolve_url(_given_url(pytestconfig))[0]
    admin = create_engine(sync_twin(given), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    name = admin.dialect.identifier_preparer.quote(str(run.url.database))
    try:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
            connection.execute(text(f"CREATE DATABASE {name}"))
        yield run.url
    finally:
        run.factory.dispose()
        force = " WITH (FORCE)" if admin.dialect.name == "postgresql" else ""
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name}{force}"))
        admin.dispose()


def _prepared_database(dbsession_url: URL, pytestconfig: pytest.Config) -> URL:
    """The ``dbsession_database`` fixture: a database that cannot be used fails the test
    with one line naming the setting it came from (no traceback, no password)."""
    __tracebackhide__ = True
    try:
        return _prepare(dbsession_url, pytestconfig)
    except DbSessionError as error:
        given = pytestconfig.getoption("dbsession_url")
        where = "--dbsession-url" if given else URL_ENV if os.environ.get(URL_ENV) else "default"
        pytest.fail(
            f"dbsession: the test database {mask_url(dbsession_url)} (from {where}) cannot "
            f"be used: {error}",
            pytrace=False,
        )


def _prepare(dbsession_url: URL, pytestconfig: pytest.Config) -> URL:
    schema = _setting(pytestconfig, "dbsession_schema") or "auto"
    if schema not in SCHEMA_CHOICES:
        raise pytest.UsageError(
            f"--dbsession-schema={schema!r} is not one of {', '.join(SCHEMA_CHOICES)}."
        )
    if schema == "none":
        _check_reachable(dbsession_url)
        return dbsession_url
    from . import migrations  # Alembic is only imported when a database is prepared

    url = sync_twin(dbsession_url)  # Alembic and create_all run outside any event loop
    if schema in ("auto", "migrations"):
        location = _migrations_location(pytestconfig)
        try:
            config = migrations.make_config(location, url=url)
        except MigrationsNotFoundError:
            if schema == "migrations":
                raise
        else:
            _migrate_test_database(config, url)
            return dbsession_url
    metadata = migrations.load_metadata(
        _setting(pytestconfig, "dbsession_metadata") or DEFAULT_METADATA
    )
    factory = DbSessionFactory(url)
    try:
        metadata.create_all(factory.engine)
    finally:
        factory.dispose()
    return dbsession_url


#: What an env.py must mention to be handed the test database (see _migrate_test_database).
_URL_SOURCES = ("run_env", "sqlalchemy.url", "get_main_option", "get_section", "attributes")


def _migrate_test_database(config: Config, url: URL) -> None:
    """Upgrade the test database, and only it, to head, whatever kind of env.py the
    project has: dbsession's ``run_env()`` reads the URL from the config's attributes;
    a stock Alembic env.py reads ``sqlalchemy.url``, set here to the test URL (and
    ``DATABASE_URL`` is the test URL while it runs). An env.py that reads none of them
    is refused before it runs; one that migrated something else is caught afterwards.
    """
    from alembic import command
    from alembic.script import ScriptDirectory

    from . import migrations

    env_py = Path(ScriptDirectory.from_config(config).dir) / "env.py"
    source = env_py.read_text(encoding="utf-8") if env_py.is_file() else ""
    if not any(word in source for word in _URL_SOURCES):
        raise MigrationError(
            f"dbsession will not run {env_py}: it reads its database URL from none of "
            "sqlalchemy.url, config.attributes or dbsession's run_env(), so it would "
            "migrate some other database than the test one. Make it read "
            "config.get_main_option('sqlalchemy.url'), or use --dbsession-schema create_all."
        )
    config.set_main_option(
        "sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%")
    )
    saved = os.environ.get("DATABASE_URL")
    os.environ["DATABASE_URL"] = url.render_as_string(hide_password=False)
    try:
        migrations.run_command(command.upgrade, config, "head")
    finally:
        if saved is None:
            del os.environ["DATABASE_URL"]
        else:
            os.environ["DATABASE_URL"] = saved
    head = ScriptDirectory.from_config(config).get_current_head()
    if migrations.current(url=url) != head:
        raise MigrationError(
            f"{env_py} ran but the test database {mask_url(url)} is not at the head "
            f"revision {head}: the env.py migrated another database. Make it read "
            "config.get_main_option('sqlalchemy.url') (dbsession sets it to the test URL)."
        )


def _check_reachable(url: URL) -> None:
    factory = DbSessionFactory(sync_twin(url))
    try:
        factory.engine.connect().close()
    finally:
        factory.dispose()


def _migrations_location(config: pytest.Config) -> Path | None:
    """The explicit setting, else alembic.ini or migrations/ in the rootdir (None: look in cwd)."""
    explicit = _setting(config, "dbsession_migrations")
    if explicit:
        return Path(explicit)
    if os.environ.get("DBSESSION_MIGRATIONS"):
        return None
    for candidate in (config.rootpath / "alembic.ini", config.rootpath / "migrations"):
        if candidate.is_file() or (candidate / "env.py").is_file():
            return candidate
    return None


def _sync_factory(run: _Run) -> Iterator[DbSessionFactory]:
    """The ``dbsession_factory`` fixture: the run's factory, disposed at the end."""
    __tracebackhide__ = True
    yield run.factory
    run.connections.release(run.factory, _as_is)
    run.factory.dispose()


# ---------------------------------------------------------------------------------------
# One test: its rolled-back transaction, who may use its connection, its on_commit hooks.


class _Hooks:
    """The ``on_commit`` hooks of the units of work committed inside one test's
    transaction: dropped, unless a ``dbsession_capture_on_commit`` block is open."""

    def __init__(self) -> None:
        self.captures: list[list[Hook]] = []

    def divert(self, hooks: list[Hook]) -> None:
        """Receive the hooks of one committed unit of work (see ``run_hooks``)."""
        for captured in self.captures:
            captured.extend(hooks)

    @contextmanager
    def capture(self, *, execute: bool = False) -> Iterator[list[Hook]]:
        """Collect the hooks registered in the block; with ``execute``, run them at its
        end (and those they register), in order, letting their exceptions propagate."""
        captured: list[Hook] = []
        self.captures.append(captured)
        try:
            yield captured
            done = 0
            while execute and done < len(captured):
                captured[done]()
                done += 1
        finally:
            self.captures.remove(captured)


class _OneUser:
    """Who may have a session on the test's connection: one thread or asyncio task at a
    time. A DBAPI connection serves one caller; two units of work open at once would
    interleave their SAVEPOINTs, or their packets (MariaDB: a corrupt protocol). A
    thread or task that comes while another one's session is open is refused; one that
    comes after it was closed (a request that FastAPI runs in its thread pool while the
    test waits for the response) is served."""

    def __init__(self, fixture: str) -> None:
        self._fixture = fixture
        self._lock = threading.Lock()
        self._users: list[tuple[_Owner, Any]] = []

    def wrap(self, maker: Any) -> Any:
        """A callable like ``maker`` that checks the caller before making a session."""
        return _CheckedMaker(maker, self)

    @contextmanager
    def admitted(self) -> Iterator[Callable[[Any], None]]:
        """Hold the check while a session is made; the block's callable records it.
        Raises SharedConnectionError when another thread or task has a session open."""
        owner = _owner()
        with self._lock:
            self._users = [(o, s) for o, s in self._users if not _finished(o, s)]
            other = next((o for o, _ in self._users if o != owner), None)
            if other is not None:
                kind = "thread" if other[0] != owner[0] else "asyncio task"
                raise SharedConnectionError(
                    f"A {kind} asked for a session while another {kind}'s unit of work is "
                    f"open on the test's one connection ({self._fixture}): two at once would "
                    "interleave on it. Let them run one after the other, or drop "
                    f"{self._fixture} and mark the test @pytest.mark.dbsession: every "
                    f"{kind} then gets a session of its own that commits for real."
                )
            yield lambda session: self._users.append((owner, session))

    def forget(self, session: Any) -> None:
        """Stop counting ``session`` as a user (the fixture's own, used by the test)."""
        with self._lock:
            self._users = [(o, s) for o, s in self._users if s is not session]


_Owner = tuple[int, "asyncio.Task[Any] | None"]


def _owner() -> _Owner:
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop running in this thread
        task = None
    return threading.get_ident(), task


class _CheckedMaker:
    """A joined sessionmaker whose sessions one thread or task at a time gets."""

    def __init__(self, maker: Any, users: _OneUser) -> None:
        self._maker = maker
        self._users = users

    def __call__(self, **kwargs: Any) -> Any:
        with self._users.admitted() as record:
            session = self._maker(**kwargs)
            record(session)
        return session


def _finished(owner: _Owner, session: Any) -> bool:
    task = owner[1]
    if task is not None and task.done():
        return True
    state = getattr(getattr(session, "sync_session", session), "_close_state", None)
    return state is not None and state.name == "CLOSED"


_HOOKS = pytest.StashKey[_Hooks]()


def _hooks_of(request: pytest.FixtureRequest) -> _Hooks:
    """The on_commit hooks of the running test's units of work (one object per test)."""
    stash: pytest.Stash = request.node.stash
    if _HOOKS not in stash:
        stash[_HOOKS] = _Hooks()
    return stash[_HOOKS]


def _sync_session(
    request: pytest.FixtureRequest, dbsession_factory: DbSessionFactory, run: _Run
) -> Iterator[Session]:
    """The ``db_session`` fixture (see ``_rolled_back_session``)."""
    __tracebackhide__ = True
    yield from _rolled_back_session(
        dbsession_factory, _as_is, _hooks_of(request), "db_session", run.connections
    )


def _as_is(value: Any) -> Any:
    return value


class _Connections:
    """The connection each factory's tests run on, kept checked out from one test to the
    next (each test begins and rolls back its own transaction on it), so a test costs
    no pool checkout, pre-ping and checkin; replaced if it was closed or invalidated."""

    def __init__(self) -> None:
        self._held: dict[int, Any] = {}

    def of(self, factory: LazyFactory[Any], run: Callable[[Any], Any]) -> Any:
        """The connection of ``factory``'s tests (``run`` as in ``_rolled_back_session``)."""
        held = self._held.get(id(factory))
        if held is None or held.closed or held.invalidated:
            held = self._held[id(factory)] = run(factory._build().engine.connect())
        return held

    def release(self, factory: LazyFactory[Any], run: Callable[[Any], Any]) -> None:
        """Close ``factory``'s connection (before the factory is disposed)."""
        held = self._held.pop(id(factory), None)
        if held is not None:
            run(held.close())


def _rolled_back_session(
    factory: LazyFactory[Any],
    run: Callable[[Any], Any],
    hooks: _Hooks,
    fixture: str,
    connections: _Connections,
) -> Iterator[Any]:
    """Yield a session of ``factory`` in an outer transaction on one connection, rolled
    back afterwards, while every session the factory makes joins it (``_joined``).

    One body for both sides: ``run`` is the identity on the sync side and runs the
    coroutine to completion on the plugin's event loop on the async side.
    """
    __tracebackhide__ = True
    connection = connections.of(factory, run)
    users = _OneUser(fixture)
    try:
        run(connection.begin())
        pinned = type(factory)._registry.replaced_by(factory, pinned=True)
        divert = {DIVERT_HOOKS_KEY: hooks.divert}
        joined = factory._joined(connection, info=divert, wrap=users.wrap)
        with pinned, joined as bound:
            session = bound.maker()()
            users.forget(session)
            try:
                yield session
            finally:
                run(session.close())
    finally:
        if connection.in_transaction():
            run(connection.rollback())


def _async_factory(
    run: _Run, dbsession_event_loop: asyncio.AbstractEventLoop
) -> Iterator[AsyncDbSessionFactory]:
    """The ``async_dbsession_factory`` fixture: the run's async factory, disposed at the end."""
    factory = run.async_default()
    yield factory
    run.connections.release(factory, dbsession_event_loop.run_until_complete)
    dbsession_event_loop.run_until_complete(factory.dispose())


def _async_session(
    request: pytest.FixtureRequest,
    async_dbsession_factory: AsyncDbSessionFactory,
    dbsession_event_loop: asyncio.AbstractEventLoop,
    run: _Run,
) -> Iterator[AsyncSession]:
    """The ``async_db_session`` fixture (see ``_rolled_back_session``)."""
    _refuse_foreign_runner(request.node)
    yield from _rolled_back_session(
        async_dbsession_factory,
        dbsession_event_loop.run_until_complete,
        _hooks_of(request),
        "async_db_session",
        run.connections,
    )


_FOREIGN_RUNNERS = ("asyncio", "anyio", "trio")


def _refuse_foreign_runner(node: pytest.Item) -> None:
    """Fail early, and clearly, when another plugin would run the test on another loop."""
    for name in _FOREIGN_RUNNERS:
        if node.get_closest_marker(name) is not None:
            pytest.fail(
                f"{node.nodeid} is marked {name!r}, so another plugin would run it on its own "
                "event loop, but async_db_session's connection belongs to dbsession's loop. "
                "Remove the mark: dbsession runs async def tests that use its async fixtures "
                "itself (with pytest-asyncio, keep asyncio_mode = strict).",
                pytrace=False,
            )
