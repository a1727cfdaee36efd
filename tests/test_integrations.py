"""dbsession.integrations: the FastAPI dependency and the Flask decorator on an instance factory.

Tiny apps on the ``factory`` fixture (a DbSessionFactory instance, not the process
default; the async app uses an AsyncDbSessionFactory on the same database), through
each framework's own test client, on every backend. No ``from __future__ import
annotations``: FastAPI reads the views' annotations, which name a local ``Depends``.
"""

import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import pytest
from conftest import require_extra
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dbsession import DbSessionFactory
from dbsession.example.models import Supplier

# app: the modules it needs, each with the extra that installs it
APPS = {
    "fastapi": {"fastapi": "fastapi"},
    "fastapi-async": {"fastapi": "fastapi", "aiosqlite": "async", "aiomysql": "async"},
    "flask": {"flask": "flask"},
}
Post = Callable[[str], int]  # path -> status
T = TypeVar("T")


def suppliers(factory: DbSessionFactory) -> list[str]:
    with factory.session_scope() as session:
        return sorted(session.scalars(select(Supplier.name)))


def fastapi_post(factory: DbSessionFactory) -> Iterator[Post]:
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.testclient import TestClient

    from dbsession.integrations.fastapi import session_dependency

    db = Depends(session_dependency(factory), scope="function")
    app = FastAPI()

    @app.post("/add/{name}", status_code=201)
    def add(name: str, session: Annotated[Session, db]) -> dict[str, str]:
        session.add(Supplier(name=name))  # no flush: a duplicate fails at commit
        return {"added": name}

    @app.post("/add-then-fail/{name}")
    def add_then_fail(name: str, session: Annotated[Session, db]) -> None:
        session.add(Supplier(name=name))
        session.flush()
        if name == "http":
            raise HTTPException(418, "after the write")
        raise RuntimeError("after the write")

    client = TestClient(app, raise_server_exceptions=False)
    yield lambda path: client.post(path).status_code


def fastapi_async_post(factory: DbSessionFactory) -> Iterator[Post]:
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.testclient import TestClient
    from sqlalchemy.ext.asyncio import AsyncSession

    from dbsession.asyncio import AsyncDbSessionFactory
    from dbsession.integrations.fastapi import async_session_dependency

    url = factory.url
    async_factory = AsyncDbSessionFactory(url.set(drivername=url.get_backend_name()))
    db = Depends(async_session_dependency(async_factory), scope="function")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await async_factory.dispose()  # in the loop that opened the connections

    app = FastAPI(lifespan=lifespan)

    @app.post("/add/{name}", status_code=201)
    async def add(name: str, session: Annotated[AsyncSession, db]) -> dict[str, str]:
        session.add(Supplier(name=name))  # no flush: a duplicate fails at commit
        return {"added": name}

    @app.post("/add-then-fail/{name}")
    async def add_then_fail(name: str, session: Annotated[AsyncSession, db]) -> None:
        session.add(Supplier(name=name))
        await session.flush()
        if name == "http":
            raise HTTPException(418, "after the write")
        raise RuntimeError("after the write")

    with TestClient(app, raise_server_exceptions=False) as client:
        yield lambda path: client.post(path).status_code


def flask_post(factory: DbSessionFactory) -> Iterator[Post]:
    from flask import Flask, abort

    from dbsession.integrations.flask import unit_of_work

    app = Flask(__name__)

    @app.post("/add/<name>")
    @unit_of_work(factory)
    def add(session: Session, name: str) -> tuple[dict[str, str], int]:
        session.add(Supplier(name=name))  # no flush: a duplicate fails at commit
        return {"added": name}, 201

    @app.post("/add-then-fail/<name>")
    @unit_of_work(factory)
    def add_then_fail(session: Session, name: str) -> tuple[dict[str, str], int]:
        session.add(Supplier(name=name))
        session.flush()
        if name == "http":
            abort(418, "after the write")
        raise RuntimeError("after the write")

    client = app.test_client()
    yield lambda path: client.post(path).status_code


def app_client(
    request: pytest.FixtureRequest,
    factory: DbSessionFactory,
    apps: Mapping[str, Callable[[DbSessionFactory], Iterator[T]]],
) -> Iterator[T]:
    """The client ``apps[request.param](factory)`` yields, once the app's extras are there."""
    name: str = request.param
    for module, extra in APPS[name].items():
        require_extra(module, extra)
    yield from apps[name](factory)


@pytest.fixture(params=list(APPS))
def post(request: pytest.FixtureRequest, factory: DbSessionFactory) -> Iterator[Post]:
    """POST to a tiny app whose views use ``factory``'s database."""
    apps = {"fastapi": fastapi_post, "fastapi-async": fastapi_async_post, "flask": flask_post}
    yield from app_client(request, factory, apps)


def test_view_that_returns_is_committed_before_the_response(
    post: Post, factory: DbSessionFactory
) -> None:
    assert post("/add/ACME") == 201
    assert suppliers(factory) == ["ACME"]


def test_commit_that_fails_becomes_an_error_response_not_a_success(
    post: Post, factory: DbSessionFactory
) -> None:
    assert post("/add/ACME") == 201
    assert post("/add/ACME") == 500  # the unique violation surfaces at commit
    assert suppliers(factory) == ["ACME"]


@pytest.mark.parametrize(("name", "status"), [("http", 418), ("crash", 500)])
def test_view_that_raises_after_writes_is_rolled_back(
    post: Post, factory: DbSessionFactory, name: str, status: int
) -> None:
    assert post(f"/add-then-fail/{name}") == status
    assert suppliers(factory) == []
    with factory.session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Supplier)) == 0


def test_flask_decorator_refuses_an_async_view() -> None:
    require_extra("flask", "flask")
    from dbsession.integrations.flask import unit_of_work

    async def view(session: Session) -> Any:
        return None

    with pytest.raises(TypeError, match="cannot wrap the async view"):
        unit_of_work()(view)


def test_importing_dbsession_imports_no_web_framework() -> None:
    code = "import sys, dbsession; print(sorted({'fastapi', 'flask'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
