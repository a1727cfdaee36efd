"""Load for the SQLite stress test and benchmark: a CPU hog, and read-modify-write units.

``cpu_hog(n)`` starts ``n`` busy Python processes and stops them (by their own pids)
when the block ends. A unit of work reads one counter and writes it back plus one,
the pattern that loses updates or deadlocks without a write lock taken up front.
``process_writers`` runs in a spawned worker process: ``threads`` threads of
``units`` units each, through ``run_in_transaction`` (SQLITE_BUSY from the other
processes is retried), on a factory of its own.
"""

from __future__ import annotations

import logging
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import text
from sqlalchemy.orm import Session

from dbsession import DbSessionFactory, RetryPolicy

COUNTERS = 8
#: retries of SQLITE_BUSY from other processes: the default attempts, waits of at most 0.2 s
RETRY = RetryPolicy(max_delay=0.2)
BUSY = "while True: pass"


@contextmanager
def cpu_hog(processes: int) -> Iterator[None]:
    """Keep ``processes`` busy-looping Python processes running during the block."""
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(processes)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


class RetryCount(logging.Handler):
    """Counts the retries ``run_in_transaction`` logs on the ``dbsession`` logger."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.retries += 1


@contextmanager
def counting_retries() -> Iterator[RetryCount]:
    """Count the retries of ``run_in_transaction`` in this process during the block."""
    counter = RetryCount()
    logger = logging.getLogger("dbsession")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(counter)
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)


def create_counters(factory: DbSessionFactory) -> None:
    """The table of ``COUNTERS`` counters, all at 0."""
    with factory.session_scope() as session:
        session.execute(text("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
        for row in range(COUNTERS):
            session.execute(text("INSERT INTO counter (id, n) VALUES (:id, 0)"), {"id": row})


def total(factory: DbSessionFactory) -> int:
    """The sum of the counters: the number of units committed, if none was lost."""
    with factory.session_scope(readonly=True) as session:
        return int(session.scalar(text("SELECT SUM(n) FROM counter")) or 0)


def bump(session: Session, row: int) -> None:
    """Read counter ``row`` and write it back plus one (in the caller's transaction)."""
    value = session.execute(text("SELECT n FROM counter WHERE id = :id"), {"id": row}).scalar_one()
    session.execute(text("UPDATE counter SET n = :n WHERE id = :id"), {"n": value + 1, "id": row})


def run_threads(threads: int, work: Callable[[int], None]) -> None:
    """Run ``work(number)`` in ``threads`` threads at once and wait for all of them."""
    started = [threading.Thread(target=work, args=(number,)) for number in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join()


def thread_writers(
    factory: DbSessionFactory, threads: int, units: int, seed: int
) -> tuple[int, list[str]]:
    """``threads`` threads x ``units`` bumps through ``run_in_transaction``: (committed, errors)."""
    committed: list[int] = []
    errors: list[str] = []

    unit = factory.transactional(retry=RETRY)(bump)

    def work(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        for _ in range(units):
            try:
                unit(rng.randrange(COUNTERS))
                committed.append(1)
            except Exception as error:
                errors.append(f"{type(error).__name__}: {str(error).splitlines()[0]}")

    run_threads(threads, work)
    return len(committed), errors


def process_writers(url: str, threads: int, units: int, seed: int) -> tuple[int, list[str], int]:
    """In a worker process: ``thread_writers`` on a factory of its own, disposed after;
    (committed, errors, retries of SQLITE_BUSY)."""
    factory = DbSessionFactory(url)
    try:
        with counting_retries() as counter:
            committed, errors = thread_writers(factory, threads, units, seed)
        return committed, errors, counter.retries
    finally:
        factory.dispose()
