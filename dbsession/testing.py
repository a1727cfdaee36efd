"""The dbsession pytest plugin: every test runs in a transaction that is rolled back at its end.

Registered through the ``pytest11`` entry point, so installing dbsession is enough;
``import dbsession`` never imports this module. Fixtures:

- ``dbsession_url`` (session): ``--dbsession-url``, else ``DBSESSION_TEST_URL``, else
  a temporary SQLite file for this run.
- ``dbsession_database`` (session): that database with its schema prepared once:
  Alembic migrations (``--dbsession-schema=migrations``), ``create_all()`` of
  ``--dbsession-metadata`` (``create_all``), nothing (``none``), or ``auto``: the
  migrations when the project has some, else ``create_all()``.
- ``dbsession_factory`` (session): a DbSessionFactory on that database.
- ``db_session`` (function): a Session on one connection whose outer transaction is
  rolled back after the test; the app's own ``session_scope()`` calls join it as
  SAVEPOINTs, so code that commits is undone too.
- ``dbsession_event_loop`` (session), ``async_dbsession_factory`` (session),
  ``async_db_session`` (function): the async twins, on one event loop of the
  plugin's own. An ``async def`` test that uses them is run on that loop by the
  plugin itself (no pytest-asyncio or anyio needed). The async drivers are only
  imported when these fixtures are used.

Every option also reads the ini setting of the same name with underscores
(``dbsession_schema = create_all`` in ``[tool.pytest.ini_options]``); the command
line wins.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from ._config import async_twin, mask_url, resolve_url, sync_twin
from ._errors import DbSessionError, MigrationsNotFoundError
from ._factory import DbSessionFactory
from ._lifecycle import LazyFactory

if TYPE_CHECKING:  # the async side is imported only when its fixtures are used
    from sqlalchemy.ext.asyncio import AsyncSession

    from .asyncio import AsyncDbSessionFactory

URL_ENV = "DBSESSION_TEST_URL"
SCHEMA_CHOICES = ("auto", "migrations", "create_all", "none")
DEFAULT_METADATA = "dbsession:Base.metadata"

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


def _setting(config: pytest.Config, name: str) -> str | None:
    value = config.getoption(name) or config.getini(name)
    return str(value) if value else None


@pytest.fixture(scope="session")
def dbsession_url(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> URL:
    """The database URL under test: --dbsession-url, else DBSESSION_TEST_URL, else temp SQLite."""
    given = pytestconfig.getoption("dbsession_url") or os.environ.get(URL_ENV)
    if given:
        return resolve_url(given)[0]
    return URL.create("sqlite", database=str(tmp_path_factory.mktemp("dbsession") / "test.db"))


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

    if schema in ("auto", "migrations"):
        location = _migrations_location(pytestconfig)
        try:
            migrations.make_config(location)
        except MigrationsNotFoundError:
            if schema == "migrations":
                raise
        else:
            migrations.upgrade(url=dbsession_url, migrations=location)
            return dbsession_url
    metadata = migrations.load_metadata(
        _setting(pytestconfig, "dbsession_metadata") or DEFAULT_METADATA
    )
    factory = DbSessionFactory(sync_twin(dbsession_url))
    try:
        metadata.create_all(factory.engine)
    finally:
        factory.dispose()
    return dbsession_url


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
def dbsession_factory(dbsession_database: URL) -> Iterator[DbSessionFactory]:
    """A DbSessionFactory on the prepared test database, disposed at the end of the run."""
    __tracebackhide__ = True
    factory = DbSessionFactory(sync_twin(dbsession_database))
    yield factory
    factory.dispose()


@pytest.fixture
def db_session(dbsession_factory: DbSessionFactory) -> Iterator[Session]:
    """A Session in a transaction rolled back after the test; app session_scope()s join it."""
    __tracebackhide__ = True
    yield from _rolled_back_session(dbsession_factory, _as_is)


def _as_is(value: Any) -> Any:
    return value


def _rolled_back_session(factory: LazyFactory[Any], run: Callable[[Any], Any]) -> Iterator[Any]:
    """Yield a session of ``factory`` in an outer transaction on one connection, rolled
    back afterwards, while every session the factory makes joins it (``_joined``).

    One body for both sides: ``run`` is the identity on the sync side and runs the
    coroutine to completion on the plugin's event loop on the async side.
    """
    __tracebackhide__ = True
    connection = run(factory._build().engine.connect())
    try:
        run(connection.begin())
        with factory._joined(connection) as bound:
            session = bound.maker()()
            try:
                yield session
            finally:
                run(session.close())
    finally:
        try:
            if connection.in_transaction():
                run(connection.rollback())
        finally:
            run(connection.close())


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
    dbsession_database: URL, dbsession_event_loop: asyncio.AbstractEventLoop
) -> Iterator[AsyncDbSessionFactory]:
    """An AsyncDbSessionFactory on the prepared test database (its async driver)."""
    from .asyncio import AsyncDbSessionFactory

    factory = AsyncDbSessionFactory(async_twin(dbsession_database))
    yield factory
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
        async_dbsession_factory, dbsession_event_loop.run_until_complete
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
