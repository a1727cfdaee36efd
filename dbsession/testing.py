"""The work behind dbsession's pytest fixtures: each test runs in a transaction rolled back.

The fixtures themselves are registered by the tiny ``pytest_dbsession`` module (the
``pytest11`` entry point, so installing dbsession is enough), which imports this
module only when a test uses one of them: SQLAlchemy is not imported at pytest
start in projects that never do. ``import dbsession`` never imports this module.
The fixtures are ``dbsession_url``, ``dbsession_database``, ``dbsession_factory``,
``db_session``, and the async twins ``dbsession_event_loop``,
``async_dbsession_factory`` and ``async_db_session`` (see docs/testing.md); the
async drivers are only imported when the async fixtures are used.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from pytest_dbsession import DEFAULT_METADATA, SCHEMA_CHOICES, URL_ENV

from ._config import async_twin, mask_url, resolve_url, sync_twin
from ._errors import DbSessionError, MigrationsNotFoundError
from ._factory import DbSessionFactory
from ._lifecycle import LazyFactory

if TYPE_CHECKING:  # the async side is imported only when its fixtures are used
    from sqlalchemy.ext.asyncio import AsyncSession

    from .asyncio import AsyncDbSessionFactory


def _setting(config: pytest.Config, name: str) -> str | None:
    value = config.getoption(name) or config.getini(name)
    return str(value) if value else None


def database_url(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> URL:
    """The database URL under test: --dbsession-url, else DBSESSION_TEST_URL, else temp SQLite."""
    given = config.getoption("dbsession_url") or os.environ.get(URL_ENV)
    if given:
        return resolve_url(given)[0]
    return URL.create("sqlite", database=str(tmp_path_factory.mktemp("dbsession") / "test.db"))


def prepare_database(url: URL, config: pytest.Config) -> URL:
    """Give the database under test its schema (--dbsession-schema) and return its URL.

    A database that cannot be used fails every test that needs it with one line naming
    the setting it came from (no traceback, no password). Raises pytest.UsageError for
    an unknown schema choice.
    """
    __tracebackhide__ = True
    try:
        return _prepare(url, config)
    except DbSessionError as error:
        given = config.getoption("dbsession_url")
        where = "--dbsession-url" if given else URL_ENV if os.environ.get(URL_ENV) else "default"
        pytest.fail(
            f"dbsession: the test database {mask_url(url)} (from {where}) cannot "
            f"be used: {error}",
            pytrace=False,
        )


def _prepare(url: URL, config: pytest.Config) -> URL:
    schema = _setting(config, "dbsession_schema") or "auto"
    if schema not in SCHEMA_CHOICES:
        raise pytest.UsageError(
            f"--dbsession-schema={schema!r} is not one of {', '.join(SCHEMA_CHOICES)}."
        )
    if schema == "none":
        _check_reachable(url)
        return url
    from . import migrations  # Alembic is only imported when a database is prepared

    if schema in ("auto", "migrations"):
        location = _migrations_location(config)
        try:
            migrations.make_config(location)
        except MigrationsNotFoundError:
            if schema == "migrations":
                raise
        else:
            migrations.upgrade(url=url, migrations=location)
            return url
    metadata = migrations.load_metadata(_setting(config, "dbsession_metadata") or DEFAULT_METADATA)
    factory = DbSessionFactory(sync_twin(url))
    try:
        metadata.create_all(factory.engine)
    finally:
        factory.dispose()
    return url


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


def sync_factory(url: URL) -> Iterator[DbSessionFactory]:
    """Yield a DbSessionFactory on the prepared test database, disposed afterwards."""
    factory = DbSessionFactory(sync_twin(url))
    yield factory
    factory.dispose()


def rolled_back_session(factory: DbSessionFactory) -> Iterator[Session]:
    """Yield a Session in a transaction rolled back afterwards; the factory's scopes join it."""
    yield from _rolled_back_session(factory, _as_is)


def async_factory(
    url: URL, loop: asyncio.AbstractEventLoop
) -> Iterator[AsyncDbSessionFactory]:
    """Yield an AsyncDbSessionFactory on the prepared test database (its async driver)."""
    from .asyncio import AsyncDbSessionFactory

    factory = AsyncDbSessionFactory(async_twin(url))
    yield factory
    loop.run_until_complete(factory.dispose())


def rolled_back_async_session(
    factory: AsyncDbSessionFactory, loop: asyncio.AbstractEventLoop
) -> Iterator[AsyncSession]:
    """The async twin of rolled_back_session, run on the plugin's event loop."""
    yield from _rolled_back_session(factory, loop.run_until_complete)


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


_FOREIGN_RUNNERS = ("asyncio", "anyio", "trio")


def refuse_foreign_runner(node: pytest.Item) -> None:
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
