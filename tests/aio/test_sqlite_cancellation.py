"""Cancelling an async SQLite writer at any moment leaves no lock behind.

8 tasks x 60 writing scopes on one SQLite file (aiosqlite); about 20% of the scopes
are cancelled from outside after a random delay: while waiting for the write gate,
during BEGIN IMMEDIATE, mid-statement, between statements, or during the commit.
The cyclic garbage collector is off during the run, so a connection left holding
SQLite's write lock until it is collected (the old failure) would make the writers
behind it fail. No writer may fail, every unit is all or nothing (the counter equals
the number of ledger rows), every unit that ended normally is in the ledger, and
afterwards both the gate and SQLite's own write lock are free.
"""

from __future__ import annotations

import asyncio
import gc
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from dbsession._sqlite_gate import gate_for, gate_key

from .conftest import Run

TASKS, SCOPES, CANCELLED = 8, 60, 0.2


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("seed", range(2))
def test_cancelling_writers_at_random_moments_leaves_no_lock(
    tmp_path: Path, run: Run[Any], no_cyclic_gc: None, seed: int
) -> None:
    from dbsession.asyncio import AsyncDbSessionFactory

    path = tmp_path / "cancel.sqlite3"
    factory = AsyncDbSessionFactory(f"sqlite+aiosqlite:///{path}", pool_size=TASKS)
    finished: list[str] = []
    errors: list[BaseException] = []

    async def unit(name: str, row: int) -> None:
        async with factory.session_scope() as session:
            await session.execute(text("INSERT INTO ledger (name) VALUES (:n)"), {"n": name})
            n = await session.execute(text("SELECT n FROM counter WHERE id = :id"), {"id": row})
            await session.execute(
                text("UPDATE counter SET n = :n WHERE id = :id"),
                {"n": n.scalar_one() + 1, "id": row},
            )

    async def worker(number: int) -> None:
        rng = random.Random(seed * 100 + number)
        for i in range(SCOPES):
            name = f"{number}-{i}"
            task = asyncio.create_task(unit(name, rng.randrange(4)))
            if rng.random() < CANCELLED:
                await asyncio.sleep(rng.uniform(0, 0.004))
                task.cancel()
            try:
                await task
                finished.append(name)
            except asyncio.CancelledError:
                pass
            except Exception as error:
                errors.append(error)

    async def body() -> tuple[int, set[str]]:
        async with factory.engine.begin() as connection:
            await connection.execute(text("CREATE TABLE ledger (name TEXT PRIMARY KEY)"))
            await connection.execute(text("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INT)"))
            for row in range(4):
                await connection.execute(text(f"INSERT INTO counter VALUES ({row}, 0)"))
        await asyncio.gather(*(worker(n) for n in range(TASKS)))
        async with factory.session_scope(readonly=True) as session:
            count = (await session.execute(text("SELECT SUM(n) FROM counter"))).scalar_one()
            names = set((await session.execute(text("SELECT name FROM ledger"))).scalars())
        return count, names

    try:
        count, names = run(body())
        assert errors == []
        assert count == len(names)  # all or nothing, cancelled or not
        assert set(finished) <= names
        assert not gate_for(gate_key(str(path)))._held
        raw = sqlite3.connect(path, timeout=0, isolation_level=None)  # no waiting at all
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("ROLLBACK")
        raw.close()
    finally:
        run(factory.dispose())
