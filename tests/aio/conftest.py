"""Fixtures for the async tests: an event loop per test, and an async factory per backend.

No pytest plugin: each test runs its coroutine with ``run(...)`` on a loop of its own,
and the loop outlives the test body so the engine is disposed in the loop its
connections were opened in. Without the async drivers the tests skip, naming
``pip install 'sqlalchemy-dbsession[async]'``; with ``CI=true`` they fail instead.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from sqlalchemy.engine import URL

from dbsession.asyncio import AsyncDbSessionFactory
from dbsession.example.models import Base

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]

ASYNC_MODULES = ("greenlet", "aiosqlite", "aiomysql", "psycopg")


def _require_async_drivers() -> None:
    missing = [name for name in ASYNC_MODULES if importlib.util.find_spec(name) is None]
    if not missing:
        return
    message = (
        f"async drivers not installed ({', '.join(missing)}): "
        "pip install 'sqlalchemy-dbsession[async]' (and 'sqlalchemy-dbsession[postgres]')"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)


@pytest.fixture
def run() -> Iterator[Run[Any]]:
    """Run a coroutine to completion on this test's event loop; the default async factory
    is disposed on the same loop afterwards."""
    _require_async_drivers()
    loop = asyncio.new_event_loop()

    def run_on_loop(coroutine: Coroutine[Any, Any, T]) -> T:
        return loop.run_until_complete(coroutine)

    yield run_on_loop
    try:
        loop.run_until_complete(AsyncDbSessionFactory.global_dispose(allow_lazy=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


def bare(url: URL) -> URL:
    """The URL without its (sync) driver, so the async factory picks the async one."""
    return url.set(drivername=url.get_backend_name())


@pytest.fixture
def async_factory(backend_url: URL, run: Run[Any]) -> Iterator[AsyncDbSessionFactory]:
    """An async factory on the backend, example tables created, dropped and disposed after."""
    factory = AsyncDbSessionFactory(bare(backend_url))
    run(factory.create_all(Base.metadata))
    yield factory

    async def drop_and_dispose() -> None:
        async with factory.engine.begin() as connection:
            await connection.run_sync(Base.metadata.drop_all)
        await factory.dispose()

    run(drop_and_dispose())
