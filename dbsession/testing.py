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

Every option also reads the ini setting of the same name with underscores
(``dbsession_schema = create_all`` in ``[tool.pytest.ini_options]``); the command
line wins.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from ._config import resolve_url
from ._errors import MigrationsNotFoundError
from ._factory import DbSessionFactory

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
    """The database under test with its schema prepared once per run (--dbsession-schema)."""
    schema = _setting(pytestconfig, "dbsession_schema") or "auto"
    if schema not in SCHEMA_CHOICES:
        raise pytest.UsageError(
            f"--dbsession-schema={schema!r} is not one of {', '.join(SCHEMA_CHOICES)}."
        )
    if schema == "none":
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
    factory = DbSessionFactory(dbsession_url)
    try:
        metadata.create_all(factory.engine)
    finally:
        factory.dispose()
    return dbsession_url


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
    factory = DbSessionFactory(dbsession_database)
    yield factory
    factory.dispose()


@pytest.fixture
def db_session(dbsession_factory: DbSessionFactory) -> Iterator[Session]:
    """A Session in a transaction rolled back after the test; app session_scope()s join it."""
    with dbsession_factory.engine.connect() as connection:
        transaction = connection.begin()
        try:
            with dbsession_factory._joined(connection) as make_session:
                session = make_session()
                try:
                    yield session
                finally:
                    session.close()
        finally:
            if transaction.is_active:
                transaction.rollback()
