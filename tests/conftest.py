"""Backends under test: SQLite always; PostgreSQL and MariaDB from the environment or locally.

Each test run creates its own database on each server (``dbsession_test_<random>``)
and drops it at the end, so runs never see each other's tables. With ``CI=true``
an unreachable server fails the run; elsewhere its tests are skipped, saying how
to point them at a server.
"""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from deploy_fixtures import pgbouncer, pgbouncer_session, replica, silent_server  # noqa: F401
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

import dbsession.example.models  # noqa: F401  (registers the example tables)
from dbsession import Base, DbSessionFactory, migrations

SERVERS = {
    "postgresql": (
        "DBSESSION_TEST_POSTGRES_URL",
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    ),
    "mysql": ("DBSESSION_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
BACKENDS = ["sqlite", *SERVERS]
ALEMBIC_INI = Path(__file__).resolve().parents[1] / "alembic.ini"


def require_extra(module: str, extra: str) -> ModuleType:
    """Import an optional framework, or skip naming the extra (with CI=true, fail instead)."""
    if os.environ.get("CI", "").lower() != "true":
        pytest.importorskip(module, reason=f"needs pip install 'dbsession[{extra}]'")
    return importlib.import_module(module)


def _admin_engine(url: URL) -> Engine:
    args = {"connect_timeout": 5}
    return create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT", connect_args=args)


def _server_database(backend: str) -> Iterator[URL]:
    """Create a database of its own for this run on one server; drop it at the end."""
    variable, default = SERVERS[backend]
    base = make_url(os.environ.get(variable) or default)
    name = f"dbsession_test_{uuid.uuid4().hex[:10]}"
    admin = _admin_engine(base)
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
    except SQLAlchemyError as error:
        message = (
            f"{backend} is not reachable at {base.render_as_string(hide_password=True)} "
            f"({type(error).__name__}). Start it, or set {variable} to a server URL."
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    yield base.set(database=name)
    with admin.connect() as conn:
        force = " WITH (FORCE)" if backend == "postgresql" else ""
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}{force}"))
    admin.dispose()


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[URL]:
    """A PostgreSQL database of this run's own (DBSESSION_TEST_POSTGRES_URL or local)."""
    yield from _server_database("postgresql")


@pytest.fixture(scope="session")
def mysql_url() -> Iterator[URL]:
    """A MariaDB/MySQL database of this run's own (DBSESSION_TEST_MYSQL_URL or local)."""
    yield from _server_database("mysql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test that uses ``backend_url`` once per backend, or per backend named by
    ``@pytest.mark.backends(...)`` for behaviour that exists only there (never a skip)."""
    if "backend_url" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        names = list(marker.args) if marker is not None else BACKENDS
        metafunc.parametrize("backend_url", names, indirect=True)


@pytest.fixture
def backend_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> URL:
    """The URL of an empty database on each backend in turn."""
    backend: str = request.param
    if backend == "sqlite":
        return URL.create("sqlite", database=str(tmp_path_factory.mktemp("db") / "test.sqlite3"))
    url: URL = request.getfixturevalue(f"{backend}_url")
    return url


@pytest.fixture
def factory(backend_url: URL) -> Iterator[DbSessionFactory]:
    """A factory on the backend with the example tables created; tables dropped afterwards."""
    made = DbSessionFactory(backend_url)
    Base.metadata.create_all(made.engine)
    yield made
    Base.metadata.drop_all(made.engine)
    made.dispose()


@pytest.fixture
def db_url(backend_url: URL) -> Iterator[URL]:
    """The backend's database, migrated down to base and version table dropped afterwards."""
    yield backend_url
    migrate_to_base(backend_url)


def migrate_to_base(url: URL) -> None:
    """Downgrade the database to base and drop Alembic's version table."""
    migrations.downgrade("base", url=url, migrations=ALEMBIC_INI)
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()


@pytest.fixture
def other_connection(backend_url: URL) -> Iterator[Engine]:
    """An engine independent of dbsession, to check what really is in the database."""
    engine = create_engine(backend_url, poolclass=NullPool)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _clean_process_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """No DATABASE_URL leaks in, the default SQLite file lands in a temp folder, and the
    process default factory is disposed after each test."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    DbSessionFactory.global_dispose(allow_lazy=True)
