"""The async twins name the user's function in retry log lines and RetryExhaustedError."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from dbsession import RetryExhaustedError, RetryPolicy
from dbsession.asyncio import AsyncDbSessionFactory

from .conftest import Run

TWO = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.002)


async def transfer(session: AsyncSession, amount: int = 1) -> None:
    await session.execute(text("CREATE TABLE ledger (amount INTEGER)"))


class Bank:
    async def transfer(self, session: AsyncSession, amount: int = 1) -> None:
        await transfer(session, amount)


def ways(factory: AsyncDbSessionFactory) -> dict[str, Callable[[], Awaitable[Any]]]:
    bare = factory.transactional(transfer)
    configured = factory.transactional(retry=TWO)(transfer)

    on_methods: Callable[[Callable[..., Any]], Any] = factory.transactional(retry=TWO)

    class Teller:
        @on_methods
        async def transfer(self, session: AsyncSession, amount: int = 1) -> None:
            await Bank().transfer(session, amount)

    return {
        "transfer": lambda: factory.run_in_transaction(transfer, 5, retry=TWO),
        "Bank.transfer": lambda: factory.run_in_transaction(Bank().transfer, 5, retry=TWO),
        "transfer (bare)": lambda: bare(5),
        "transfer (options)": lambda: configured(amount=5),
        "Teller.transfer": lambda: Teller().transfer(5),
    }


@pytest.mark.parametrize(
    "way",
    ["transfer", "Bank.transfer", "transfer (bare)", "transfer (options)", "Teller.transfer"],
)
def test_async_retry_messages_name_the_function(
    tmp_path: Path, run: Run[Any], caplog: pytest.LogCaptureFixture, way: str
) -> None:
    caplog.set_level(logging.INFO, logger="dbsession")
    path = tmp_path / "busy.sqlite3"
    made = AsyncDbSessionFactory(f"sqlite:///{path}", sqlite_busy_timeout=0)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    name = way.split(" ")[0]

    async def body() -> None:
        try:
            await ways(made)[way]()
        finally:
            await made.dispose()

    try:
        with pytest.raises(RetryExhaustedError) as caught:
            run(body())
    finally:
        holder.close()
    logged = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert logged[0].startswith(
        f"dbsession: {name}: SQLITE_BUSY database is locked on attempt 1 ("
    ), logged
    assert str(caught.value).startswith(
        f"{name} failed with a transient error (SQLITE_BUSY database is locked) on each of "
    ), str(caught.value)
