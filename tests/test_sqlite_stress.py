"""SQLite under load: no "database is locked", no lost update, on a machine kept busy.

A CPU hog (2x the cores of busy processes, started and stopped here) runs while one
SQLite file gets, all at once: 16 threads of read-modify-write units, 16 asyncio tasks
(on an event loop in a thread of its own, through the async factory), and 4 worker
processes of 4 threads each (spawned, each with its own factory, as gunicorn workers
would be). Each engine's pool has a connection for each of its writers: with fewer,
the pool's own checkout wait (30 s, not fair either) is the next cliff. Every unit
goes through ``run_in_transaction`` (only other processes can make SQLite answer
SQLITE_BUSY; that is retried). The invariants: not one error, and the counters add
up to exactly the number of committed units.

``-m 'not slow'`` deselects it. docs/sqlite.md records five runs.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import threading
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession
from sqlite_load import (
    COUNTERS,
    RETRY,
    bump,
    counting_retries,
    cpu_hog,
    create_counters,
    process_writers,
    thread_writers,
    total,
)

from dbsession import DbSessionFactory

THREADS, THREAD_UNITS = 16, 500
TASKS, TASK_UNITS = 16, 100
PROCESSES, PROCESS_THREADS, PROCESS_UNITS = 4, 4, 100


def async_writers(url: str, tasks: int, units: int, seed: int) -> tuple[int, list[str]]:
    """``tasks`` asyncio tasks x ``units`` bumps on an async factory: (committed, errors)."""
    from dbsession.asyncio import AsyncDbSessionFactory

    committed: list[int] = []
    errors: list[str] = []

    async def async_bump(session: AsyncSession, row: int) -> None:
        await session.run_sync(bump, row)

    async def task(factory: AsyncDbSessionFactory, number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        unit = factory.transactional(retry=RETRY)(async_bump)
        for _ in range(units):
            try:
                await unit(rng.randrange(COUNTERS))
                committed.append(1)
            except Exception as error:
                errors.append(f"{type(error).__name__}: {str(error).splitlines()[0]}")

    async def body() -> None:
        factory = AsyncDbSessionFactory(url, pool_size=tasks)
        try:
            await asyncio.gather(*(task(factory, n) for n in range(tasks)))
        finally:
            await factory.dispose()

    asyncio.run(body())
    return len(committed), errors


@pytest.mark.slow
def test_writers_of_threads_tasks_and_processes_under_cpu_load_lose_nothing(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'stress.sqlite3'}"
    factory = DbSessionFactory(url, pool_size=THREADS)  # a connection for every writer
    create_counters(factory)
    results: dict[str, tuple[int, list[str]]] = {}

    def in_thread(name: str, run: object, *args: object) -> threading.Thread:
        def target() -> None:
            results[name] = run(*args)  # type: ignore[operator]

        thread = threading.Thread(target=target, name=name)
        thread.start()
        return thread

    async_url = url.replace("sqlite:", "sqlite+aiosqlite:")
    spawn = multiprocessing.get_context("spawn")
    try:
        hog = cpu_hog(2 * (os.cpu_count() or 1))
        with hog, spawn.Pool(PROCESSES) as pool, counting_retries() as counter:
            others = [
                pool.apply_async(process_writers, (url, PROCESS_THREADS, PROCESS_UNITS, 100 + n))
                for n in range(PROCESSES)
            ]
            runners = [
                in_thread("threads", thread_writers, factory, THREADS, THREAD_UNITS, 1),
                in_thread("tasks", async_writers, async_url, TASKS, TASK_UNITS, 2),
            ]
            for runner in runners:
                runner.join()
            retries = {"this process": counter.retries}
            for n, other in enumerate(others):
                committed, errors, retries[f"process {n}"] = other.get(timeout=600)
                results[f"process {n}"] = committed, errors
        committed = sum(count for count, _ in results.values())
        errors = [error for _, found in results.values() for error in found]
        expected = THREADS * THREAD_UNITS + TASKS * TASK_UNITS
        expected += PROCESSES * PROCESS_THREADS * PROCESS_UNITS
        print(f"\ncommitted {committed}, errors {len(errors)}, SQLITE_BUSY retries {retries}")
        assert errors == []
        assert committed == expected
        assert total(factory) == committed  # not one update lost
    finally:
        factory.dispose()
