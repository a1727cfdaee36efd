"""Retry log lines and RetryExhaustedError name the user's function (docs/transactions.md:
``dbsession: transfer: ...``), whichever way it was run: run_in_transaction,
@transactional bare or with options, on a function or a method."""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from dbsession import DbSessionFactory, RetryExhaustedError, RetryPolicy

TWO = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.002)


@pytest.fixture
def busy(tmp_path: Path) -> Iterator[DbSessionFactory]:
    """A factory whose every write fails with SQLITE_BUSY (another connection holds the
    file's write lock), so each unit of work is retried until the attempts run out."""
    path = str(tmp_path / "busy.sqlite3")
    made = DbSessionFactory(f"sqlite:///{path}", sqlite_busy_timeout=0)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield made
    finally:
        holder.close()
        made.dispose()


def transfer(session: Session, amount: int = 1) -> None:
    session.execute(text("CREATE TABLE ledger (amount INTEGER)"))


class Bank:
    def transfer(self, session: Session, amount: int = 1) -> None:
        transfer(session, amount)


def ways(factory: DbSessionFactory) -> dict[str, Callable[[], Any]]:
    """Each way of running the unit, and the name the messages must use."""
    bare = factory.transactional(transfer)
    configured = factory.transactional(retry=TWO)(transfer)

    on_methods: Callable[[Callable[..., Any]], Any] = factory.transactional(retry=TWO)

    class Teller:
        @on_methods
        def transfer(self, session: Session, amount: int = 1) -> None:
            Bank().transfer(session, amount)

    return {
        "transfer": lambda: factory.run_in_transaction(transfer, 5, retry=TWO),
        "Bank.transfer": lambda: factory.run_in_transaction(Bank().transfer, amount=5, retry=TWO),
        "transfer ": lambda: bare(5),
        " transfer": lambda: configured(amount=5),
        "Teller.transfer": lambda: Teller().transfer(5),
    }


@pytest.mark.parametrize("way", ["transfer", "Bank.transfer", " transfer", "Teller.transfer"])
def test_the_retry_log_line_and_the_error_name_the_function(
    busy: DbSessionFactory, caplog: pytest.LogCaptureFixture, way: str
) -> None:
    caplog.set_level(logging.INFO, logger="dbsession")
    name = way.strip()

    with pytest.raises(RetryExhaustedError) as caught:
        ways(busy)[way]()

    logged = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(logged) == 1
    assert re.fullmatch(
        rf"dbsession: {re.escape(name)}: SQLITE_BUSY database is locked on attempt 1 "
        r"\(\d+\.\ds of the 15s budget left\); retrying in 0\.00\ds",
        logged[0],
    ), logged[0]
    assert re.match(
        rf"{re.escape(name)} failed with a transient error \(SQLITE_BUSY database is locked\) "
        r"on each of 2 attempts in \d+\.\ds; giving up\.",
        str(caught.value),
    ), str(caught.value)


def test_bare_transactional_names_the_function_with_the_default_policy(
    busy: DbSessionFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dbsession")
    with pytest.raises(RetryExhaustedError, match=r"^transfer failed .* each of \d+ attempts"):
        ways(busy)["transfer "]()  # until the default policy's 15 s budget runs out
    logged = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert logged and {line.split(" on attempt")[0] for line in logged} == {
        "dbsession: transfer: SQLITE_BUSY database is locked"
    }
