"""Issue 28: under overload, a request's unit of work never holds its connection while it
waits for one of the thread pool's workers.

The sync ``DbSession`` dependency ends its scope (the commit) in a worker thread after the
path operation returned, and the connection is still checked out until that commit. When
that hop queued for a token of anyio's default thread limiter (40 threads), the tokens
could all be held by other requests' path operations blocked on the pool, waiting for this
very connection: every one of them waited until its checkout timed out. Here the
deterministic form of that pile-up, with a pool of one connection and two threads:

- request A writes (its connection is out) and returns once B and C both wait;
- request B's path operation (thread 1 of 2) waits for a connection;
- request C's path operation (a unit of work of its own) waits for a thread, and takes
  A's thread when A returns.

A's commit must not need a third thread: every request succeeds and no checkout times out.
The template's bare dependency (``with Session(engine) as session: yield session``, the
path operation commits) passes the same scenario. Driven in process through httpx's
ASGI transport on SQLite and PostgreSQL. No ``from __future__ import annotations``:
FastAPI reads the views' annotations.
"""

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any

import pytest
from helpers import require_extra
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import URL, Engine
from sqlalchemy.orm import Session

from dbsession import DbSessionFactory
from dbsession.example.models import Base, Supplier

if TYPE_CHECKING:
    from fastapi import FastAPI

POOL_TIMEOUT = 5.0  # what a request waits for the one connection before a 503
SYNC_TIMEOUT = 30.0  # how long a step of the scenario may take to happen at all


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Block until ``condition()`` holds (a step of the scenario, not a timing)."""
    deadline = time.monotonic() + SYNC_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"the scenario never reached: {what}")
        time.sleep(0.005)


class Scenario:
    """The three requests' path operations around one pool, and what they saw."""

    def __init__(self, open_session: Callable[[], Any], commits: bool) -> None:
        self.open_session = open_session  # for C's own unit of work
        self.commits = commits  # the bare app's path operations commit themselves
        self.a_holds = threading.Event()
        self.b_runs = threading.Event()
        self.c_ran = threading.Event()
        self.limiter: Any = None  # anyio's default thread limiter, set by pile_up

    def write(self, session: Session) -> dict[str, int]:
        """A: write (the connection is checked out), return once B runs and C waits."""
        session.add(Supplier(name="a"))
        session.flush()
        if self.commits:
            session.commit()
        self.a_holds.set()
        wait_for(self.b_runs.is_set, "B's path operation runs")
        wait_for(
            lambda: self.limiter.statistics().tasks_waiting >= 1 or self.c_ran.is_set(),
            "C waits for a thread",
        )
        return {"a": 1}

    def read(self, session: Session) -> dict[str, int]:
        """B: holds the second thread and waits for the connection."""
        self.b_runs.set()
        count = session.scalar(select(func.count()).select_from(Supplier))
        return {"suppliers": int(count or 0)}

    def other(self) -> dict[str, int]:
        """C: a path operation without the dependency, with a unit of work of its own."""
        self.c_ran.set()
        with self.open_session() as session:
            count = session.scalar(select(func.count()).select_from(Supplier))
            if self.commits:
                session.commit()
        return {"suppliers": int(count or 0)}


def fastapi_app() -> "FastAPI":
    """An app whose pool timeouts are 503 ``pool timeout`` responses."""
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    app = FastAPI()

    @app.exception_handler(PoolTimeout)
    async def pool_timeout(request: Request, error: PoolTimeout) -> PlainTextResponse:
        return PlainTextResponse("pool timeout", status_code=503)

    return app


def dbsession_app(factory: DbSessionFactory) -> tuple["FastAPI", Scenario]:
    from fastapi import Depends

    from dbsession.integrations.fastapi import session_dependency

    scenario = Scenario(factory.session_scope, commits=False)
    db = Depends(session_dependency(factory), scope="function")
    return scenario_app(scenario, db), scenario


def scenario_app(scenario: Scenario, db: Any) -> "FastAPI":
    """The three path operations of ``scenario``, their session from the dependency ``db``."""
    app = fastapi_app()

    # response_model=None: no response validation, which FastAPI would run in a worker
    # thread of its own (the test is about the dependency's hops).
    @app.post("/a", response_model=None)
    def a(session: Annotated[Session, db]) -> dict[str, int]:
        return scenario.write(session)

    @app.get("/b", response_model=None)
    def b(session: Annotated[Session, db]) -> dict[str, int]:
        return scenario.read(session)

    @app.get("/c", response_model=None)
    def c() -> dict[str, int]:
        return scenario.other()

    return app


def bare_app(engine: Engine) -> tuple["FastAPI", Scenario]:
    from fastapi import Depends

    def get_db() -> Iterator[Session]:
        with Session(engine) as session:
            yield session

    scenario = Scenario(lambda: Session(engine), commits=True)
    return scenario_app(scenario, Depends(get_db)), scenario


async def until(event: threading.Event, what: str) -> None:
    """Wait in the event loop (without a worker thread) until ``event`` is set."""
    deadline = time.monotonic() + SYNC_TIMEOUT
    while not event.is_set():
        if time.monotonic() > deadline:
            raise AssertionError(f"the scenario never reached: {what}")
        await asyncio.sleep(0.005)


async def pile_up(app: "FastAPI", scenario: Scenario) -> list[tuple[int, str]]:
    """Run A, then B, then C on a thread pool of two; return each status and body."""
    import anyio.to_thread
    import httpx

    scenario.limiter = anyio.to_thread.current_default_thread_limiter()
    scenario.limiter.total_tokens = 2
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        a = asyncio.ensure_future(client.post("/a"))
        await until(scenario.a_holds, "A holds the connection")
        b = asyncio.ensure_future(client.get("/b"))
        await until(scenario.b_runs, "B's path operation runs")
        c = asyncio.ensure_future(client.get("/c"))
        responses = await asyncio.gather(a, b, c)
    return [(r.status_code, r.text) for r in responses]


@pytest.fixture
def tables(backend_url: URL) -> Iterator[URL]:
    engine = create_engine(backend_url)
    Base.metadata.create_all(engine)
    yield backend_url
    Base.metadata.drop_all(engine)
    engine.dispose()


@pytest.mark.backends("sqlite", "postgresql")
def test_a_units_commit_does_not_wait_for_a_thread_while_others_wait_for_its_connection(
    tables: URL,
) -> None:
    require_extra("fastapi", "fastapi")
    factory = DbSessionFactory(tables, pool_size=1, max_overflow=0, pool_timeout=POOL_TIMEOUT)
    try:
        app, scenario = dbsession_app(factory)
        statuses = asyncio.run(pile_up(app, scenario))
    finally:
        factory.dispose()
    assert statuses == [(200, '{"a":1}'), (200, '{"suppliers":1}'), (200, '{"suppliers":1}')]


@pytest.mark.backends("sqlite", "postgresql")
def test_the_bare_templates_dependency_passes_the_same_pile_up(tables: URL) -> None:
    """The scenario is fair: without dbsession, no checkout times out either."""
    require_extra("fastapi", "fastapi")
    engine = create_engine(tables, pool_size=1, max_overflow=0, pool_timeout=POOL_TIMEOUT)
    try:
        app, scenario = bare_app(engine)
        statuses = asyncio.run(pile_up(app, scenario))
    finally:
        engine.dispose()
    assert statuses == [(200, '{"a":1}'), (200, '{"suppliers":1}'), (200, '{"suppliers":1}')]
