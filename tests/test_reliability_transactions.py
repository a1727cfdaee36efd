"""Reliability of run_in_transaction under load: SERIALIZABLE transfers from many threads
are retried until the books balance exactly, and on_commit hooks run once per commit."""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any

import pytest
from helpers import (
    BASE,
    CAP,
    Injected,
    assert_books_match,
    random_transfer,
    retries,
    run_threads,
    transfer,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from dbsession import DbSessionFactory, RetryPolicy, on_commit

THREADS = 8
TRANSFERS_PER_THREAD = 40
TRANSIENT = {"postgresql": "SQLSTATE 40001", "mysql": "1213 deadlock"}


@pytest.mark.slow
@pytest.mark.backends("postgresql", "mysql")  # SQLite's BEGIN IMMEDIATE queues writers
def test_serializable_transfers_from_8_threads_are_retried_and_balance_exactly(
    ledger: DbSessionFactory,
    other_connection: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dbsession")
    committed: dict[str, tuple[int, int, int]] = {}
    failed: set[str] = set()
    hooked: list[str] = []  # list.append is atomic: no lock needed
    unexpected: list[BaseException] = []

    def unlocked_transfer(session: Session, name: str, *args: Any) -> None:
        on_commit(lambda: hooked.append(name))
        transfer(session, name, *args, locked=False)

    def worker(number: int) -> None:
        rng = random.Random(number)
        for i in range(TRANSFERS_PER_THREAD):
            name, source, target, amount, fail_at = random_transfer(rng, number, i)
            try:
                ledger.transactional(
                    retry=RetryPolicy(attempts=100, base_delay=BASE, max_delay=CAP),
                    isolation_level="SERIALIZABLE",
                )(unlocked_transfer)(
                    name,
                    source,
                    target,
                    amount,
                    fail_at,
                )
            except Injected:
                failed.add(name)
            except Exception as error:  # retries exhausted, or anything unforeseen
                unexpected.append(error)
            else:
                committed[name] = (source, target, amount)

    run_threads(worker, THREADS)

    assert unexpected == []
    assert len(committed) + len(failed) == THREADS * TRANSFERS_PER_THREAD
    assert failed  # some failed on purpose, and were not retried
    logged = retries(caplog)
    backend = ledger.url.get_backend_name()
    assert sum(TRANSIENT[backend] in line for line in logged) >= THREADS  # real contention
    assert_books_match(other_connection, committed)
    assert Counter(hooked) == Counter(
        committed.keys()
    )  # once per committed transfer, never a failed one
    assert ledger.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
