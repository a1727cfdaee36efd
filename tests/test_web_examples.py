"""The web examples end to end, through each framework's own test client, on every backend.

Each request is one unit of work: committed when the handler returns, rolled back
when it raises (an HTTP error raised after writes included); concurrent requests get
sessions of their own; no connection stays checked out of the pool.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from helpers import require_extra
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

from dbsession import default_factory
from dbsession.example.models import Customer

if TYPE_CHECKING:
    from fastapi import FastAPI

# app: the modules it needs, each with the extra that installs it
APPS = {
    "fastapi": {"fastapi": "fastapi"},
    "fastapi-async": {"fastapi": "fastapi", "aiosqlite": "async", "aiomysql": "async"},
    "flask": {"flask": "flask"},
}
CONCURRENT = 20


@dataclass
class Api:
    """One framework's test client behind one signature: (method, path, json) -> (status, json)."""

    call: Callable[[str, str, Any], tuple[int, Any]]
    engine: Callable[[], Engine]  # the app's (sync) engine, for its pool

    def checked_out(self) -> int:
        """Connections of the app's pool that are checked out right now."""
        pool = self.engine().pool
        assert isinstance(pool, QueuePool)
        return pool.checkedout()

    def get(self, path: str) -> tuple[int, Any]:
        return self.call("GET", path, None)

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        return self.call("POST", path, body)


def fastapi_api(app: FastAPI, engine: Callable[[], Engine]) -> Iterator[Api]:
    from fastapi.testclient import TestClient

    with TestClient(app) as client:  # runs the lifespan: migrate, global_init

        def call(method: str, path: str, body: Any) -> tuple[int, Any]:
            response = client.request(method, path, json=body)
            return response.status_code, response.json()

        api = Api(call, engine)
        yield api
        assert api.checked_out() == 0


def fastapi_sync_api(url: URL) -> Iterator[Api]:
    from examples.fastapi_app.app import create_app

    yield from fastapi_api(create_app(url), lambda: default_factory().engine)


def fastapi_async_api(url: URL) -> Iterator[Api]:
    from dbsession.asyncio import async_default_factory
    from examples.fastapi_app.async_app import create_app

    def engine() -> Engine:
        return async_default_factory().engine.sync_engine

    # No driver in the URL: the migrations pick the sync one, the app the async one.
    yield from fastapi_api(create_app(url.set(drivername=url.get_backend_name())), engine)


def flask_api(url: URL) -> Iterator[Api]:
    from examples.flask_app import create_app

    app = create_app(url)  # migrates and calls global_init

    def call(method: str, path: str, body: Any) -> tuple[int, Any]:
        response = app.test_client().open(path, method=method, json=body)
        return response.status_code, response.get_json()

    api = Api(call, lambda: default_factory().engine)
    yield api
    assert api.checked_out() == 0


@pytest.fixture(params=list(APPS))
def api(request: pytest.FixtureRequest, db_url: URL) -> Iterator[Api]:
    """The store API of one example app on the backend's database."""
    name: str = request.param
    for module, extra in APPS[name].items():
        require_extra(module, extra)
    make = {"fastapi": fastapi_sync_api, "fastapi-async": fastapi_async_api, "flask": flask_api}
    yield from make[name](db_url)


def rows(engine: Engine, sql: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql))]


def test_orders_placed_by_requests_are_committed_and_listed_oldest_first(
    api: Api, other_connection: Engine
) -> None:
    status, ada = api.post("/customers", {"name": "Ada", "email": "ada@example.com"})
    assert status == 201
    for supplier, amount in [("ACME", "120.00"), ("Globex", "35.50"), ("ACME", "9.99")]:
        body = {"customer_id": ada["id"], "supplier": supplier, "amount": amount}
        assert api.post("/orders", body)[0] == 201
    status, orders = api.get("/orders")
    assert status == 200
    assert [(o["supplier"], o["amount"]) for o in orders] == [
        ("ACME", "120.00"),
        ("Globex", "35.50"),
        ("ACME", "9.99"),
    ]
    assert rows(other_connection, "SELECT name FROM supplier ORDER BY name") == [
        ("ACME",),
        ("Globex",),
    ]


def test_http_error_raised_after_writes_leaves_no_partial_order(
    api: Api, other_connection: Engine
) -> None:
    _, ada = api.post("/customers", {"name": "Ada", "email": "ada@example.com"})
    declined = {"customer_id": ada["id"], "supplier": "NewCo", "amount": "5000.00"}
    status, body = api.post("/orders", declined)
    assert status == 402
    assert "over the limit" in body["detail"]  # the order had been flushed: it had an id
    assert rows(other_connection, "SELECT COUNT(*) FROM orders") == [(0,)]
    assert rows(other_connection, "SELECT COUNT(*) FROM supplier") == [(0,)]
    assert api.checked_out() == 0
    assert api.post("/orders", {**declined, "amount": "50.00"})[0] == 201
    assert [o["supplier"] for o in api.get("/orders")[1]] == ["NewCo"]


def test_error_turned_into_a_response_by_a_handler_still_rolls_back(
    api: Api, other_connection: Engine
) -> None:
    assert api.post("/customers", {"name": "Ada", "email": "ada@example.com"})[0] == 201
    status, body = api.post("/customers", {"name": "Eve", "email": "ada@example.com"})
    assert (status, body["detail"]) == (409, "conflict: a unique value is taken")
    assert rows(other_connection, "SELECT name FROM customer") == [("Ada",)]


def test_unknown_customer_answers_404_and_writes_nothing(
    api: Api, other_connection: Engine
) -> None:
    status, _ = api.post("/orders", {"customer_id": 404, "supplier": "ACME", "amount": "1"})
    assert status == 404
    assert api.get("/customers/404")[0] == 404
    assert rows(other_connection, "SELECT COUNT(*) FROM supplier") == [(0,)]


def test_twenty_concurrent_requests_each_get_their_own_session(
    api: Api, other_connection: Engine
) -> None:
    sessions: dict[str, set[int]] = {}  # email -> the sessions that flushed it
    lock = threading.Lock()

    def record(session: Session, *_: Any) -> None:
        with lock:
            for obj in session.new:
                if isinstance(obj, Customer):
                    sessions.setdefault(obj.email, set()).add(session.hash_key)

    start = threading.Barrier(CONCURRENT)

    def one_request(i: int) -> tuple[int, dict[str, Any], dict[str, Any]]:
        start.wait()
        status, created = api.post("/customers", {"name": f"c{i}", "email": f"c{i}@example.com"})
        _, read_back = api.get(f"/customers/{created['id']}")
        return status, created, read_back

    event.listen(Session, "before_flush", record)
    try:
        with ThreadPoolExecutor(CONCURRENT) as pool:
            results = list(pool.map(one_request, range(CONCURRENT)))
    finally:
        event.remove(Session, "before_flush", record)

    for i, (status, created, read_back) in enumerate(results):
        assert status == 201
        assert created["email"] == read_back["email"] == f"c{i}@example.com"
    assert len({created["id"] for _, created, _ in results}) == CONCURRENT
    assert all(len(keys) == 1 for keys in sessions.values())
    assert len(set().union(*sessions.values())) == CONCURRENT  # one session per request
    assert rows(other_connection, "SELECT COUNT(*) FROM customer") == [(CONCURRENT,)]
    assert api.checked_out() == 0
