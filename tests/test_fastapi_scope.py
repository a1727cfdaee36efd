"""Issue 12: FastAPI handlers see the request's unit of work.

``current_session()`` / ``async_current_session()``, ``on_commit()`` and a nested
``session_scope()`` inside sync and async path operations, with the sync ``DbSession``
dependency and the async ``AsyncDbSession`` one on the process default factories,
through FastAPI's TestClient on every backend. No ``from __future__ import
annotations``: FastAPI reads the views' annotations.
"""

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from conftest import require_extra
from sqlalchemy import text
from sqlalchemy.engine import Engine

import dbsession
from dbsession import DbSessionFactory, current_session, on_commit
from dbsession.example.models import Supplier


def names(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(text("SELECT name FROM supplier")))


@pytest.fixture
def client(factory: DbSessionFactory) -> Iterator[tuple[Any, list[str]]]:
    """A TestClient on an app whose views use the module-level dependencies, and the list
    the views' on_commit hooks append to."""
    require_extra("fastapi", "fastapi")
    require_extra("aiosqlite", "async")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from dbsession.asyncio import (
        AsyncDbSessionFactory,
        async_current_session,
        async_session_scope,
    )
    from dbsession.integrations.fastapi import AsyncDbSession, DbSession

    hooks: list[str] = []
    DbSessionFactory.global_init(factory.url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = factory.url
        AsyncDbSessionFactory.global_init(url.set(drivername=url.get_backend_name()))
        yield
        await AsyncDbSessionFactory.global_dispose(allow_lazy=True)

    app = FastAPI(lifespan=lifespan)

    def add(name: str) -> dict[str, str]:
        current_session().add(Supplier(name=name))
        on_commit(lambda: hooks.append(name))
        with dbsession.session_scope() as nested:  # joins the request's unit of work
            nested.add(Supplier(name=f"{name}-nested"))
        return {"added": name}

    @app.post("/sync-handler/{name}", status_code=201)
    def sync_handler(name: str, session: DbSession) -> dict[str, str]:
        assert current_session() is session
        return add(name)

    @app.post("/async-handler/{name}", status_code=201)
    async def async_handler(name: str, session: DbSession) -> dict[str, str]:
        assert current_session() is session
        return add(name)

    @app.post("/async-dependency/{name}", status_code=201)
    async def async_dependency(name: str, session: AsyncDbSession) -> dict[str, str]:
        assert async_current_session() is session
        session.add(Supplier(name=name))
        on_commit(lambda: hooks.append(name))
        async with async_session_scope() as nested:
            assert nested is session
            nested.add(Supplier(name=f"{name}-nested"))
        return {"added": name}

    @app.post("/fail/{name}")
    def fail(name: str, session: DbSession) -> None:
        current_session().add(Supplier(name=name))
        on_commit(lambda: hooks.append(name))
        current_session().flush()
        raise RuntimeError("after the write")

    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client, hooks


@pytest.mark.parametrize("path", ["sync-handler", "async-handler", "async-dependency"])
def test_a_handler_sees_the_requests_scope_and_its_hooks_run_after_the_commit(
    client: tuple[Any, list[str]], other_connection: Engine, path: str
) -> None:
    test_client, hooks = client
    response = test_client.post(f"/{path}/one")
    assert response.status_code == 201, response.text
    assert names(other_connection) == {"one", "one-nested"}
    assert hooks == ["one"]


def test_a_handler_that_raises_rolls_back_and_drops_its_hooks(
    client: tuple[Any, list[str]], other_connection: Engine
) -> None:
    test_client, hooks = client
    assert test_client.post("/fail/gone").status_code == 500
    assert names(other_connection) == set()
    assert hooks == []
    assert test_client.post("/sync-handler/after").status_code == 201  # SQLite: no lock left
    assert names(other_connection) == {"after", "after-nested"}
