"""The dbsession pytest plugin: every test runs in a transaction that is rolled back at its end.

Registered through the ``pytest11`` entry point, so installing dbsession is enough;
``import dbsession`` never imports this module. Fixtures:

- ``dbsession_url`` (session): ``--dbsession-url``, else ``DBSESSION_TEST_URL``, else
  a temporary SQLite file for this run (never ``DATABASE_URL``). Under pytest-xdist
  each worker gets a database of its own, created here and dropped at the end.
- ``dbsession_database`` (session): that database with its schema prepared once:
  Alembic migrations (``--dbsession-schema=migrations``), ``create_all()`` of
  ``--dbsession-metadata`` (``create_all``), nothing (``none``), or ``auto``: the
  migrations when the project has some, else ``create_all()``.
- ``dbsession_factory`` (session): the DbSessionFactory on that database. With the
  safety catch on it is also the process default for the whole run.
- ``db_session`` (function): a Session on one connection whose outer transaction is
  rolled back after the test; the app's own ``session_scope()`` calls join it as
  SAVEPOINTs, so code that commits is undone too.
- ``dbsession_capture_on_commit`` (function): captures the ``on_commit`` hooks that
  the app's units of work register under ``db_session`` (they never run otherwise).
- ``dbsession_event_loop`` (session), ``async_dbsession_factory`` (session),
  ``async_db_session`` (function): the async twins, on one event loop of the
  plugin's own. An ``async def`` test that uses them is run on that loop by the
  plugin itself (no pytest-asyncio or anyio needed). The async drivers are only
  imported when these fixtures are used.

**The safety catch** (``dbsession_block``, on by default): while a test that did not
ask for the database runs (``db_session``, ``async_db_session``, the factories, or
``@pytest.mark.dbsession``), using the process default factory raises
DatabaseBlockedError; ``global_init()`` returns the plugin's factory whatever URL the
app gives it, so nothing reaches the app's own database.

Every option also reads the ini setting of the same name with underscores
(``dbsession_schema = create_all`` in ``[tool.pytest.ini_options]``); the command
line wins.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

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

URL_ENV = "DBSESSION_TEST_URL"
SCHEMA_CHOICES = ("auto", "migrations", "create_all", "none")
DEFAULT_METADATA = "dbsession:Base.metadata"
#: The fixtures (and the mark) by which a test asks for the database.
DATABASE_FIXTURES = frozenset(
    {"db_session", "async_db_session", "dbsession_factory", "async_dbsession_factory"}
)
MARK = "dbsession"

_OPTIONS = {
    "dbsession_schema": (
        f"How the test database gets its schema: {', '.join(SCHEMA_CHOICES)} "
        "(default auto: the Alembic migrations when the project has some, else create_all)."
    ),
    "dbsession_metadata": (
        f"Import path of the MetaData that create_all uses (default {DEFAULT_METADATA})."
    ),
    "dbsession_migrations": (
        "The migrations folder or alembic.ini (default: DBSESSION_MIGRATIONS, else "
        "alembic.ini or migrations/ in the rootdir or the current folder)."
    ),
}
_BLOCK_HELP = (
    "Refuse the process default factory in tests that did not ask for the database "
    "(db_session, async_db_session, @pytest.mark.dbsession); default true."
)


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the --dbsession-* command-line options and their ini settings."""
    group = parser.getgroup("dbsession", "dbsession: database under test")
    group.addoption(
        "--dbsession-url",
        dest="dbsession_url",
        default=None,
        help=f"Database URL for the tests (default: {URL_ENV}, else a temporary SQLite file).",
    )
    for name, help_text in _OPTIONS.items():
        group.addoption(f"--{name.replace('_', '-')}", dest=name, default=None, help=help_text)
        parser.addini(name, help_text, default=None)
    parser.addini("dbsession_block", _BLOCK_HELP, type="bool", default=True)


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
        if not self._test_run.open:
            raise DatabaseBlockedError(
                f"{self._test_run.test or 'Code outside any test'} used the database without "
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
    process defaults it pinned, and which test runs now."""

    def __init__(self, config: pytest.Config) -> None:
        self.block = bool(config.getini("dbsession_block"))
        self.open = not self.block
        self.test: str | None = None
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


_RUN = pytest.StashKey[_Run]()


def _run_of(config: pytest.Config) -> _Run:
    return config.stash[_RUN]


def _given_url(config: pytest.Config) -> str | None:
    """--dbsession-url (also before the command line is fully parsed), else DBSESSION_TEST_URL."""
    early = getattr(config, "known_args_namespace", None)
    given = config.getoption("dbsession_url", None) or getattr(early, "dbsession_url", None)
    return str(given) if given else os.environ.get(URL_ENV)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Choose the test URL and, with the catch on, pin the plugin's factory as the process
    default before the first conftest.py is imported (an app made at import included)."""
    if _RUN not in early_config.stash:
        early_config.stash[_RUN] = _Run(early_config)


def pytest_configure(config: pytest.Config) -> None:
    """Register the mark; set up the run if no conftest loading did (``-p dbsession``)."""
    config.addinivalue_line(
        "markers",
        f"{MARK}: the test uses the test database without db_session (its work commits "
        "for real there); without it, or a database fixture, the process default is refused",
    )
    if _RUN not in config.stash:
        config.stash[_RUN] = _Run(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Undo what pytest_configure did."""
    run = config.stash.get(_RUN, None)
    if run is not None:
        run.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """Open the database for a test that asked for it (fixture or mark), for its duration."""
    run = _run_of(item.config)
    asked = item.get_closest_marker(MARK) is not None or bool(
        DATABASE_FIXTURES & set(getattr(item, "fixturenames", ()))
    )
    if "dbsession.asyncio" in sys.modules:
        run.async_default()  # the app uses the async side: catch it there too
    run.test, run.open = item.nodeid, asked or not run.block
    try:
        return (yield)
    finally:
        run.test, run.open = None, not run.block


# ---------------------------------------------------------------------------------------
# The database: its URL (one per xdist worker), its schema, its factories.


@pytest.fixture(scope="session")
def dbsession_url(pytestconfig: pytest.Config) -> Iterator[URL]:
    """The database URL under test: --dbsession-url, else DBSESSION_TEST_URL, else temp SQLite.

    Under pytest-xdist a server database of the worker's own (``<name>_<run>_gw0``) is
    created here and dropped at the end; a SQLite file gets the worker id in its name.
    """
    run = _run_of(pytestconfig)
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


@pytest.fixture(scope="session")
def dbsession_database(dbsession_url: URL, pytestconfig: pytest.Config) -> URL:
    """The database under test with its schema prepared once per run (--dbsession-schema).

    A database that cannot be used fails every test that needs it with one line naming
    the setting it came from (no traceback, no password)."""
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


@pytest.fixture(scope="session")
def dbsession_factory(
    dbsession_database: URL, pytestconfig: pytest.Config
) -> Iterator[DbSessionFactory]:
    """The DbSessionFactory on the prepared test database, disposed at the end of the run."""
    __tracebackhide__ = True
    run = _run_of(pytestconfig)
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


@pytest.fixture
def dbsession_capture_on_commit(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``with dbsession_capture_on_commit(execute=True) as hooks:`` collects the on_commit
    hooks of the units of work committed in the block (under db_session they never run
    otherwise), and with ``execute=True`` runs them when the block ends."""
    return _hooks_of(request).capture


@pytest.fixture
def db_session(
    request: pytest.FixtureRequest, dbsession_factory: DbSessionFactory
) -> Iterator[Session]:
    """A Session in a transaction rolled back after the test; app session_scope()s join it."""
    __tracebackhide__ = True
    connections = _run_of(request.config).connections
    yield from _rolled_back_session(
        dbsession_factory, _as_is, _hooks_of(request), "db_session", connections
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


@pytest.fixture(scope="session")
def dbsession_event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The event loop of the async fixtures, and of the async def tests that use them."""
    loop = asyncio.new_event_loop()
    yield loop
    try:
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


@pytest.fixture(scope="session")
def async_dbsession_factory(
    dbsession_database: URL,
    dbsession_event_loop: asyncio.AbstractEventLoop,
    pytestconfig: pytest.Config,
) -> Iterator[AsyncDbSessionFactory]:
    """The AsyncDbSessionFactory on the prepared test database (its async driver)."""
    run = _run_of(pytestconfig)
    factory = run.async_default()
    yield factory
    run.connections.release(factory, dbsession_event_loop.run_until_complete)
    dbsession_event_loop.run_until_complete(factory.dispose())


@pytest.fixture
def async_db_session(
    request: pytest.FixtureRequest,
    async_dbsession_factory: AsyncDbSessionFactory,
    dbsession_event_loop: asyncio.AbstractEventLoop,
) -> Iterator[AsyncSession]:
    """An AsyncSession in a transaction rolled back after the test; app scopes join it."""
    _refuse_foreign_runner(request.node)
    yield from _rolled_back_session(
        async_dbsession_factory,
        dbsession_event_loop.run_until_complete,
        _hooks_of(request),
        "async_db_session",
        _run_of(request.config).connections,
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


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run an ``async def`` test that uses the async fixtures on the plugin's event loop."""
    if "dbsession_event_loop" not in pyfuncitem.fixturenames:
        return None
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    loop = cast(asyncio.AbstractEventLoop, pyfuncitem.funcargs["dbsession_event_loop"])
    names = pyfuncitem._fixtureinfo.argnames
    loop.run_until_complete(pyfuncitem.obj(**{name: pyfuncitem.funcargs[name] for name in names}))
    return True
