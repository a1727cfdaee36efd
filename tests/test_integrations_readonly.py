"""Read-only requests take no write lock: ``@unit_of_work(readonly=True)`` (Flask),
``session_dependency(readonly=True)`` and ``async_session_dependency(readonly=True)`` (FastAPI).

Each tiny app answers GET /count with the committed number of suppliers, and GET /write
tries to write. A writing scope in another thread holds the write lock (on SQLite the
database's write gate and SQLite's lock) while the test asks: a read-only request
still answers at once with the committed state; a writing one would wait for the lock
and fail after the busy timeout. A write in a read-only request is an error response
and leaves nothing.
No ``from __future__ import annotations``: FastAPI reads the views' annotations.
"""

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated, Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from test_integrations import APPS, app_client, suppliers

from dbsession import DbSessionFactory
from dbsession.example.models import Supplier

Get = Callable[[str], tuple[int, Any]]  # path -> status, JSON body


def count(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(Supplier)) or 0)


def answer(response: Any) -> tuple[int, Any]:
    """A FastAPI test client's response as (status, JSON body or None)."""
    return response.status_code, response.json() if response.status_code == 200 else None


def fastapi_get(factory: DbSessionFactory) -> Iterator[Get]:
    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    from dbsession.integrations.fastapi import session_dependency

    db = Depends(session_dependency(factory, readonly=True), scope="function")
    app = FastAPI()

    @app.get("/count")
    def get_count(session: Annotated[Session, db]) -> int:
        return count(session)

    @app.get("/write")
    def write(session: Annotated[Session, db]) -> None:
        session.add(Supplier(name="sneaky"))

    client = TestClient(app, raise_server_exceptions=False)
    yield lambda path: answer(client.get(path))


def fastapi_async_get(factory: DbSessionFactory) -> Iterator[Get]:
    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient
    from sqlalchemy.ext.asyncio import AsyncSession

    from dbsession.asyncio import AsyncDbSessionFactory
    from dbsession.integrations.fastapi import async_session_dependency

    url = factory.url
    async_factory = AsyncDbSessionFactory(url.set(drivername=url.get_backend_name()))
    db = Depends(async_session_dependency(async_factory, readonly=True), scope="function")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await async_factory.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/count")
    async def get_count(session: Annotated[AsyncSession, db]) -> int:
        return await session.run_sync(count)

    @app.get("/write")
    async def write(session: Annotated[AsyncSession, db]) -> None:
        session.add(Supplier(name="sneaky"))

    with TestClient(app, raise_server_exceptions=False) as client:
        yield lambda path: answer(client.get(path))


def flask_get(factory: DbSessionFactory) -> Iterator[Get]:
    from flask import Flask

    from dbsession.integrations.flask import unit_of_work

    app = Flask(__name__)

    @app.get("/count")
    @unit_of_work(factory, readonly=True)
    def get_count(session: Session) -> dict[str, int]:
        return {"count": count(session)}

    @app.get("/write")
    @unit_of_work(factory, readonly=True)
    def write(session: Session) -> dict[str, int]:
        session.add(Supplier(name="sneaky"))
        return {"count": -1}

    client = app.test_client()

    def get(path: str) -> tuple[int, Any]:
        response = client.get(path)
        body = response.get_json(silent=True)
        return response.status_code, body["count"] if isinstance(body, dict) else body

    yield get


@contextmanager
def writer_holding_the_lock(factory: DbSessionFactory) -> Iterator[None]:
    """During the block, a writing scope in another thread has flushed a row and holds
    the write lock (SQLite: the gate and BEGIN IMMEDIATE); it commits when the block ends."""
    holding, done = threading.Event(), threading.Event()

    def write() -> None:
        with factory.session_scope() as writer:
            writer.add(Supplier(name="pending"))
            writer.flush()
            holding.set()
            done.wait(60)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        assert holding.wait(60)
        yield
    finally:
        done.set()
        thread.join()


@pytest.fixture(params=list(APPS))
def get(request: pytest.FixtureRequest, factory: DbSessionFactory) -> Iterator[Get]:
    """GET from a tiny app whose views are read-only units of work on ``factory``'s database."""
    apps = {"fastapi": fastapi_get, "fastapi-async": fastapi_async_get, "flask": flask_get}
    yield from app_client(request, factory, apps)


def test_read_only_request_answers_while_a_writer_holds_the_lock(
    get: Get, factory: DbSessionFactory
) -> None:
    with factory.session_scope() as session:
        session.add(Supplier(name="committed"))
    with writer_holding_the_lock(factory):
        assert get("/count") == (200, 1)
        assert get("/count") == (200, 1)
    assert get("/count") == (200, 2)


def test_write_in_a_read_only_request_fails_and_leaves_nothing(
    get: Get, factory: DbSessionFactory
) -> None:
    status, _ = get("/write")
    assert status == 500
    assert suppliers(factory) == []
