"""PoolExhaustedError under FastAPI's async dependency names the endpoint whose request
holds the only pooled connection."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from helpers import require_extra
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession

from dbsession.asyncio import AsyncDbSessionFactory
from dbsession.errors import PoolExhaustedError

from .conftest import Run, bare

require_extra("fastapi", "fastapi")

from fastapi import Depends, FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from dbsession.integrations.fastapi import async_session_dependency  # noqa: E402


def test_an_async_request_holding_the_pool_is_named_by_its_endpoint(
    backend_url: URL, run: Run[Any]
) -> None:
    factory = AsyncDbSessionFactory(
        bare(backend_url), pool_size=1, max_overflow=0, pool_timeout=0.3
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await factory.dispose()  # in the loop that opened the connections

    api = FastAPI(lifespan=lifespan)
    db = Depends(async_session_dependency(factory), scope="function")
    held, release = threading.Event(), threading.Event()

    @api.get("/hold")
    async def hold_endpoint(session: AsyncSession = db) -> str:
        await session.execute(text("SELECT 1"))  # checks out the only connection
        held.set()
        await anyio.to_thread.run_sync(release.wait, 10)
        return "held"

    @api.get("/probe")
    async def probe_endpoint(session: AsyncSession = db) -> str:
        await session.execute(text("SELECT 1"))
        return "got one"

    answers: list[int] = []
    with TestClient(api) as client:
        holder = threading.Thread(target=lambda: answers.append(client.get("/hold").status_code))
        holder.start()
        try:
            assert held.wait(10)
            with pytest.raises(PoolExhaustedError) as caught:
                client.get("/probe")
        finally:
            release.set()
            holder.join()
    assert answers == [200]
    code = hold_endpoint.__code__
    assert f"opened at: {code.co_filename}:{code.co_firstlineno} (1)" in str(caught.value)
