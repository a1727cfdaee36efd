"""The dbsession pytest plugin: every test runs in a transaction that is rolled back at its end.

Registered through the ``pytest11`` entry point (named ``dbsession``: ``-p no:dbsession``
turns it off), so installing dbsession is enough. pytest imports this module at start-up
in every project of the environment, so it imports only pytest and the standard library:
SQLAlchemy and dbsession are imported when the project imports dbsession, or when a test
uses one of the fixtures (``dbsession.testing`` does the work). A project that never
imports dbsession pays nothing for the plugin. Fixtures:

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
``@pytest.mark.dbsession``), a unit of work or a connection of the process default
factory raises DatabaseBlockedError (building it, ``factory.engine``, does not);
``global_init()`` returns the plugin's factory whatever URL the app gives it, so
nothing reaches the app's own database. The plugin's factory becomes the process
default (``Registry.pin``, ``Registry.block``: dbsession's public seam) the moment
dbsession is imported (an import hook of this module sees it; dbsession knows
nothing of its plugin), or at start-up if it was imported before: in either case
before any code can reach the process default, a ``conftest.py`` that builds its
app at import included.

Every option also reads the ini setting of the same name with underscores
(``dbsession_schema = create_all`` in ``[tool.pytest.ini_options]``); the command
line wins.
"""

from __future__ import annotations

import importlib.abc
import inspect
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import pytest

if TYPE_CHECKING:  # none of these is imported at run time unless a test uses the database
    import asyncio

    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

    from dbsession import DbSessionFactory
    from dbsession.asyncio import AsyncDbSessionFactory
    from dbsession.testing import _Run

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


# ---------------------------------------------------------------------------------------
# The gate: which test runs and whether it asked for the database. Kept here, so that a
# run that never imports dbsession only flips two attributes per test.


class Gate:
    """One run's safety catch (one per pytest config): whether it is on, which test
    runs now and whether the database is open to it; and, once dbsession is imported,
    the run's ``dbsession.testing._Run`` (the test URL and the plugin's factories)."""

    def __init__(self, block: bool) -> None:
        self.block = block
        self.open = not block
        self.test: str | None = None
        self.run: _Run | None = None
        #: The fixtures that use the database: the plugin's, and those set up on them.
        self.database_fixtures = set(DATABASE_FIXTURES)

    def refusal(self) -> str | None:
        """Why the process default may not connect now (None: it may). dbsession asks
        this through ``Registry.block`` each time the default is about to connect."""
        if self.open:
            return None
        return (
            f"{self.test or 'Code outside any test'} used the database without asking for "
            "it: the dbsession plugin refuses the process default factory there, so nothing "
            "can reach the app's own database. Give the test the db_session fixture "
            "(async_db_session for async code), or mark it @pytest.mark.dbsession to commit "
            "for real to the test database; dbsession_block = false in the pytest ini "
            "settings turns this check off."
        )


_GATE = pytest.StashKey[Gate]()
#: The configs whose catch is on and that wait for dbsession to be imported.
_WAITING: list[pytest.Config] = []
#: The gates of the runs whose catch is on.
_BLOCKING: list[Gate] = []


def _run_of(config: pytest.Config) -> _Run:
    """The run's ``_Run``, made now if dbsession was not imported until this moment."""
    gate = config.stash[_GATE]
    if gate.run is None:
        from dbsession import testing

        # A bad test URL raises here: the run then stays waiting, so every later import
        # of dbsession raises too (none gets through without the catch).
        gate.run = testing._Run(config, gate)
        if config in _WAITING:
            _WAITING.remove(config)
        if "dbsession.asyncio" in sys.modules:
            gate.run.async_default()  # imported before this run began (say by a plugin)
    return gate.run


def _dbsession_imported(name: str) -> None:
    """Run by ``_ImportWatch`` right after ``dbsession`` (or ``dbsession.asyncio``) is
    executed, before the code that imported it goes on: pin the plugin's factory (its
    async twin) as the process default of every run with the catch on."""
    if name == "dbsession":
        for config in list(_WAITING):
            _run_of(config)
    else:
        for gate in _BLOCKING:
            if gate.run is not None:
                gate.run.async_default()


class _ImportWatch(importlib.abc.MetaPathFinder):
    """On ``sys.meta_path`` while a run with the catch on waits for dbsession: it finds
    nothing itself, but when ``dbsession`` or ``dbsession.asyncio`` is imported it wraps
    the real loader so that ``_dbsession_imported`` runs right after the module. So
    dbsession knows nothing of its plugin, and a project that never imports it pays one
    string comparison per import."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _WATCHED:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenPin(spec.loader, fullname)
                return spec
        return None


_WATCHED = ("dbsession", "dbsession.asyncio")
_WATCH = _ImportWatch()


class _ThenPin(importlib.abc.Loader):
    """The real loader of a watched module, then ``_dbsession_imported``."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = module.__spec__.loader = self._loader  # its real loader
        self._loader.exec_module(module)
        _dbsession_imported(self._name)


def _start(config: pytest.Config) -> None:
    """Set up the run's gate; with the catch on, pin the plugin's factory now if dbsession
    is imported already, else as soon as it is (``_ImportWatch``)."""
    if _GATE in config.stash:
        return
    gate = config.stash[_GATE] = Gate(bool(config.getini("dbsession_block")))
    if not gate.block:
        return  # nothing to pin: the run is made when a fixture first needs it
    _BLOCKING.append(gate)
    if _WATCH not in sys.meta_path:
        sys.meta_path.insert(0, _WATCH)
    if "dbsession" in sys.modules:
        _run_of(config)
    else:
        _WAITING.append(config)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Set up the safety catch before the first conftest.py is imported (an app made at
    import included): see ``_start``."""
    _start(early_config)


def pytest_configure(config: pytest.Config) -> None:
    """Register the mark; set up the catch if no conftest loading did (``-p dbsession``)."""
    config.addinivalue_line(
        "markers",
        f"{MARK}: the test uses the test database without db_session (its work commits "
        "for real there); without it, or a database fixture, the process default is refused",
    )
    _start(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Undo what pytest_configure did: unpin the defaults, dispose, remove the temp folder."""
    if config in _WAITING:
        _WAITING.remove(config)
    gate = config.stash.get(_GATE, None)
    if gate in _BLOCKING:
        _BLOCKING.remove(gate)
    if not _BLOCKING and _WATCH in sys.meta_path:
        sys.meta_path.remove(_WATCH)
    if gate is not None and gate.run is not None:
        gate.run.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """Open the database for a test that asked for it (fixture or mark), for its duration."""
    gate = item.config.stash[_GATE]
    asked = item.get_closest_marker(MARK) is not None or bool(
        DATABASE_FIXTURES & set(getattr(item, "fixturenames", ()))
    )
    gate.test, gate.open = item.nodeid, asked or not gate.block
    try:
        return (yield)
    finally:
        gate.test, gate.open = None, not gate.block


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Any:
    """A fixture of a wider scope than a test that uses the database (run-wide test data)
    may use it in its teardown too, whichever test's end finalizes it."""
    gate = request.config.stash.get(_GATE, None)
    if (
        gate is None
        or fixturedef.scope == "function"
        or not gate.database_fixtures.intersection(fixturedef.argnames)
    ):
        return (yield)
    saved: list[bool] = []

    def open_database() -> None:
        saved.append(gate.open)
        gate.open = True

    def restore() -> None:
        if saved:
            gate.open = saved.pop()

    # Finalizers run last in, first out: open_database, the fixture's teardown, restore.
    fixturedef.addfinalizer(restore)
    result = yield
    gate.database_fixtures.add(fixturedef.argname)
    fixturedef.addfinalizer(open_database)
    return result


# ---------------------------------------------------------------------------------------
# The fixtures: declared here (pytest --fixtures lists them from this module), done in
# dbsession.testing, which each imports on first use.


@pytest.fixture(scope="session")
def dbsession_url(pytestconfig: pytest.Config) -> Iterator[URL]:
    """The database URL under test: --dbsession-url, else DBSESSION_TEST_URL, else temp SQLite.

    Under pytest-xdist a server database of the worker's own (``<name>_<run>_gw0``) is
    created here and dropped at the end; a SQLite file gets the worker id in its name.
    """
    __tracebackhide__ = True
    from dbsession import testing

    yield from testing._database_url(_run_of(pytestconfig), pytestconfig)


@pytest.fixture(scope="session")
def dbsession_database(dbsession_url: URL, pytestconfig: pytest.Config) -> URL:
    """The database under test with its schema prepared once per run (--dbsession-schema).

    A database that cannot be used fails every test that needs it with one line naming
    the setting it came from (no traceback, no password)."""
    __tracebackhide__ = True
    from dbsession import testing

    return testing._prepared_database(_run_of(pytestconfig), dbsession_url, pytestconfig)


@pytest.fixture(scope="session")
def dbsession_factory(
    dbsession_database: URL, pytestconfig: pytest.Config
) -> Iterator[DbSessionFactory]:
    """The DbSessionFactory on the prepared test database, disposed at the end of the run."""
    __tracebackhide__ = True
    from dbsession import testing

    yield from testing._sync_factory(_run_of(pytestconfig))


@pytest.fixture
def dbsession_capture_on_commit(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``with dbsession_capture_on_commit(execute=True) as hooks:`` collects the on_commit
    hooks of the units of work committed in the block (under db_session they never run
    otherwise), and with ``execute=True`` runs them when the block ends."""
    from dbsession import testing

    return testing._hooks_of(request).capture


@pytest.fixture
def db_session(
    request: pytest.FixtureRequest, dbsession_factory: DbSessionFactory
) -> Iterator[Session]:
    """A Session in a transaction rolled back after the test; app session_scope()s join it."""
    __tracebackhide__ = True
    from dbsession import testing

    yield from testing._sync_session(request, dbsession_factory, _run_of(request.config))


@pytest.fixture(scope="session")
def dbsession_event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The event loop of the async fixtures, and of the async def tests that use them."""
    import asyncio

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
    from dbsession import testing

    yield from testing._async_factory(_run_of(pytestconfig), dbsession_event_loop)


@pytest.fixture
def async_db_session(
    request: pytest.FixtureRequest,
    async_dbsession_factory: AsyncDbSessionFactory,
    dbsession_event_loop: asyncio.AbstractEventLoop,
) -> Iterator[AsyncSession]:
    """An AsyncSession in a transaction rolled back after the test; app scopes join it."""
    from dbsession import testing

    yield from testing._async_session(
        request, async_dbsession_factory, dbsession_event_loop, _run_of(request.config)
    )


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run an ``async def`` test that uses the async fixtures on the plugin's event loop."""
    if "dbsession_event_loop" not in pyfuncitem.fixturenames:
        return None
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    loop = cast("asyncio.AbstractEventLoop", pyfuncitem.funcargs["dbsession_event_loop"])
    given = pyfuncitem.funcargs
    names = inspect.signature(pyfuncitem.obj).parameters
    loop.run_until_complete(
        pyfuncitem.obj(**{name: given[name] for name in names if name in given})
    )
    return True
