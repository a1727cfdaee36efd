"""observability.configure() at any moment never changes an async scope's outcome: tasks
open units of work (committing or rolling back) while a thread switches between every
configuration; each reports exactly what the database kept."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from helpers import Planned, reconfiguring
from sqlalchemy import select

from dbsession.asyncio import AsyncDbSessionFactory
from dbsession.example.models import Supplier

from .conftest import Run

TASKS = 4
SCOPES_PER_TASK = 40


def test_reconfiguring_under_concurrent_tasks_never_changes_an_outcome(
    async_factory: AsyncDbSessionFactory, run: Run[Any]
) -> None:
    reported: dict[str, str] = {}  # supplier name -> what its scope reported
    escaped: list[BaseException] = []

    async def worker(number: int) -> None:
        chooser = random.Random(100 + number)
        for index in range(SCOPES_PER_TASK):
            name = f"a{number}-{index}"
            fail = chooser.random() < 0.3
            try:
                async with async_factory.session_scope() as session:
                    session.add(Supplier(name=name))
                    await session.flush()
                    await asyncio.sleep(chooser.uniform(0, 0.002))
                    if fail:
                        raise Planned(name)
                reported[name] = "committed"
            except Planned:
                reported[name] = "rolled back"
            except BaseException as error:  # anything else: observability broke the scope
                escaped.append(error)
                reported[name] = "raised"

    async def kept() -> set[str]:
        async with async_factory.session_scope(readonly=True) as session:
            return set(await session.scalars(select(Supplier.name)))

    async def body() -> None:
        await asyncio.gather(*(worker(n) for n in range(TASKS)))

    with reconfiguring(seed=11):
        run(body())

    assert escaped == []
    assert len(reported) == TASKS * SCOPES_PER_TASK
    committed = {name for name, outcome in reported.items() if outcome == "committed"}
    assert run(kept()) == committed
    assert 0 < len(committed) < len(reported)
