"""PoolExhaustedError names the real holder under the web integrations: a FastAPI request
whose unit of work holds the only pooled connection is named by its endpoint (as the
slow-scope warning names it), not as a connection held "outside any unit of work"."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import require_extra
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from dbsession import DbSessionFactory, observability
from dbsession.errors import PoolExhaustedError

require_extra("fastapi", "fastapi")

from fastapi import Depends, FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from dbsession.integrations.fastapi import session_dependency  # noqa: E402


@pytest.fixture
def tiny_pool(backend_url: URL) -> Iterator[DbSessionFactory]:
    factory = DbSessionFactory(backend_url, pool_size=1, max_overflow=0, pool_timeout=0.3)
    yield factory
    factory.dispose()


def site_of(function: Callable[..., Any]) -> str:
    return f"{function.__code__.co_filename}:{function.__code__.co_firstlineno}"


@pytest.mark.parametrize("observed", [True, False], ids=["default", "observability-off"])
def test_a_request_holding_the_pool_is_named_by_its_endpoint(
    tiny_pool: DbSessionFactory, observed: bool
) -> None:
    if not observed:
        observability.configure(slow_scope_seconds=None, stats=False)
    db = Depends(session_dependency(tiny_pool), scope="function")
    api = FastAPI()
    held, release = threading.Event(), threading.Event()

    @api.get("/hold")
    def hold_endpoint(session: Session = db) -> str:
        session.execute(text("SELECT 1"))  # checks out the only connection
        held.set()
        release.wait(10)
        return "held"

    @api.get("/probe")
    def probe_endpoint(session: Session = db) -> str:
        session.execute(text("SELECT 1"))
        return "got one"

    answers: list[int] = []
    try:
        with TestClient(api) as client:
            holder = threading.Thread(
                target=lambda: answers.append(client.get("/hold").status_code)
            )
            holder.start()
            try:
                assert held.wait(10)
                with pytest.raises(PoolExhaustedError) as caught:
                    client.get("/probe")
            finally:
                release.set()
                holder.join()
    finally:
        observability.configure()
    assert answers == [200]
    message = str(caught.value)
    assert "outside any unit of work" not in message
    if observed:
        assert f"held by units of work opened at: {site_of(hold_endpoint)} (1)" in message
    else:  # nothing was recorded, and the error says so rather than guess
        assert "unrecorded call sites (observability is off" in message


@pytest.mark.backends("postgresql", "mysql")
def test_a_sync_endpoint_s_time_in_the_database_counts_for_its_unit_of_work(
    tiny_pool: DbSessionFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The handler runs in another thread than the one that opened the request's scope:
    its statements are still the unit of work's time in the database."""
    sleep = (
        "SELECT pg_sleep(0.4)"
        if tiny_pool.url.get_backend_name() == "postgresql"
        else "SELECT SLEEP(0.4)"
    )
    api = FastAPI()
    db = Depends(session_dependency(tiny_pool), scope="function")

    @api.get("/report")
    def report_endpoint(session: Session = db) -> str:
        session.execute(text(sleep))
        return "done"

    observability.configure(slow_scope_seconds=0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="dbsession"):
            with TestClient(api) as client:
                assert client.get("/report").status_code == 200
    finally:
        observability.configure()
    (message,) = [m for m in caplog.messages if "unit of work opened at" in m]
    assert site_of(report_endpoint) in message
    assert "most of it in the database" in message
