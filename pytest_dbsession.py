"""The dbsession pytest plugin's entry point (``pytest11``): options, fixtures and one hook.

This module is imported by pytest at start-up in every project of the environment, so
it imports neither SQLAlchemy nor dbsession: each fixture imports ``dbsession.testing``
(where the work is done) the first time a test uses it, and a project that never asks
for a dbsession fixture pays nothing. ``-p no:dbsession`` turns the plugin off.

Fixtures (see ``dbsession.testing`` and docs/testing.md):

- ``dbsession_url`` (session): ``--dbsession-url``, else ``DBSESSION_TEST_URL``, else
  a temporary SQLite file for this run.
- ``dbsession_database`` (session): that database with its schema prepared once
  (``--dbsession-schema``: ``auto``, ``migrations``, ``create_all`` or ``none``).
- ``dbsession_factory`` (session): a DbSessionFactory on that database.
- ``db_session`` (function): a Session in a transaction rolled back after the test;
  the app's own ``session_scope()`` calls join it as SAVEPOINTs.
- ``dbsession_event_loop`` (session), ``async_dbsession_factory`` (session),
  ``async_db_session`` (function): the async twins, on an event loop of the plugin's
  own, which also runs the ``async def`` tests that use them.

Every option also reads the ini setting of the same name with underscores
(``dbsession_schema = create_all`` in ``[tool.pytest.ini_options]``); the command
line wins.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

import pytest

if TYPE_CHECKING:
    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

    from dbsession import DbSessionFactory
    from dbsession.asyncio import AsyncDbSessionFactory

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


@pytest.fixture(scope="session")
def dbsession_url(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> URL:
    """The database URL under test: --dbsession-url, else DBSESSION_TEST_URL, else temp SQLite."""
    from dbsession import testing

    return testing.database_url(pytestconfig, tmp_path_factory)


@pytest.fixture(scope="session")
def dbsession_database(dbsession_url: URL, pytestconfig: pytest.Config) -> URL:
    """The database under test with its schema prepared once per run (--dbsession-schema)."""
    from dbsession import testing

    return testing.prepare_database(dbsession_url, pytestconfig)


@pytest.fixture(scope="session")
def dbsession_factory(dbsession_database: URL) -> Iterator[DbSessionFactory]:
    """A DbSessionFactory on the prepared test database, disposed at the end of the run."""
    from dbsession import testing

    yield from testing.sync_factory(dbsession_database)


@pytest.fixture
def db_session(dbsession_factory: DbSessionFactory) -> Iterator[Session]:
    """A Session in a transaction rolled back after the test; app session_scope()s join it."""
    from dbsession import testing

    yield from testing.rolled_back_session(dbsession_factory)


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
    from dbsession import testing

    yield from testing.async_factory(dbsession_database, dbsession_event_loop)


@pytest.fixture
def async_db_session(
    request: pytest.FixtureRequest,
    async_dbsession_factory: AsyncDbSessionFactory,
    dbsession_event_loop: asyncio.AbstractEventLoop,
) -> Iterator[AsyncSession]:
    """An AsyncSession in a transaction rolled back after the test; app scopes join it."""
    from dbsession import testing

    testing.refuse_foreign_runner(request.node)
    yield from testing.rolled_back_async_session(async_dbsession_factory, dbsession_event_loop)


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
