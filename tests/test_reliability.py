"""Reliability under load: money is never created or lost, failures leave no trace.

The accounts and ledger live on a MetaData of their own (with dbsession's naming
convention), so they never join ``dbsession.Base`` or the example models.
"""

from __future__ import annotations

import gc
import random
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from helpers import (
    ACCOUNTS,
    FAILURE_POINTS,
    OPENING_BALANCE,
    Account,
    Injected,
    Item,
    assert_books_match,
    balances,
    fail_before_commit,
    ledger_rows,
    random_transfer,
    run_threads,
    transfer,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from dbsession import DbSessionFactory

THREADS = 8
TRANSFERS_PER_THREAD = 500


@pytest.mark.slow
def test_concurrent_transfers_with_random_failures_keep_the_books_balanced(
    ledger: DbSessionFactory, other_connection: Engine
) -> None:
    committed: dict[str, tuple[int, int, int]] = {}
    failed: set[str] = set()
    unexpected: list[BaseException] = []
    lock = threading.Lock()

    def worker(number: int) -> None:
        rng = random.Random(number)
        for i in range(TRANSFERS_PER_THREAD):
            name, source, target, amount, fail_at = random_transfer(rng, number, i)
            try:
                with ledger.session_scope() as session:
                    transfer(session, name, source, target, amount, fail_at)
            except Injected:
                with lock:
                    failed.add(name)
            except Exception as error:  # a lock timeout or deadlock would land here
                with lock:
                    unexpected.append(error)
            else:
                with lock:
                    committed[name] = (source, target, amount)

    run_threads(worker, THREADS)

    assert unexpected == []
    assert len(committed) + len(failed) == THREADS * TRANSFERS_PER_THREAD
    assert 250 < len(failed) < 550  # about 10% failed on purpose
    assert_books_match(other_connection, committed)
    assert ledger.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_keyboard_interrupt_mid_transfer_rolls_back_and_returns_the_connection(
    ledger: DbSessionFactory, other_connection: Engine
) -> None:
    with pytest.raises(KeyboardInterrupt):
        with ledger.session_scope() as session:
            transfer(session, "interrupted", 0, 1, 500, None)
            raise KeyboardInterrupt

    assert ledger_rows(other_connection) == []
    assert balances(other_connection) == dict.fromkeys(range(ACCOUNTS), OPENING_BALANCE)
    assert ledger.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


RANDOM_ERRORS: tuple[Callable[[], BaseException], ...] = (
    lambda: Injected("plain"),
    lambda: KeyboardInterrupt(),
    lambda: SystemExit(3),
    lambda: GeneratorExit(),
    lambda: ValueError("value"),
)


@pytest.mark.slow
def test_ten_thousand_scopes_with_random_exceptions_leak_no_connection(
    ledger: DbSessionFactory, other_connection: Engine
) -> None:
    rng = random.Random(7)
    committed = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(10_000):
            error = rng.choice(RANDOM_ERRORS)() if rng.random() < 0.5 else None
            writes = rng.random() < 0.2
            try:
                with ledger.session_scope() as session:
                    if writes:
                        session.add(Item(name=f"k{i}", number=i))
                    point = rng.random()
                    if error is not None and point < 0.3:
                        raise error
                    session.execute(select(Account.balance).where(Account.id == i % ACCOUNTS))
                    if error is not None and point < 0.6:
                        raise error
                    if error is not None:
                        fail_before_commit(session, error)
            except BaseException as raised:
                assert raised is error
            else:
                committed += writes
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert ledger.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    with other_connection.connect() as conn:
        assert conn.scalar(text("SELECT COUNT(*) FROM rel_item")) == committed


# --- property: random units of work against an in-memory model ---------------------------

Step = tuple[str, str, int]  # ("put" | "delete" | "insert", key, value)

steps = st.lists(
    st.tuples(
        st.sampled_from(["put", "delete", "insert"]),
        st.sampled_from(["a", "b", "c", "d"]),
        st.integers(min_value=-5, max_value=5),
    ),
    max_size=6,
)
scopes = st.lists(
    st.tuples(steps, st.sampled_from([None, *FAILURE_POINTS])), min_size=1, max_size=5
)


def apply_step(session: Session, step: Step) -> None:
    """Run one step in the session: upsert, delete if present, or a plain insert."""
    kind, key, value = step
    if kind == "insert":  # an IntegrityError at flush when the key exists: a real failure
        session.add(Item(name=key, number=value))
        session.flush()
    elif kind == "delete":
        session.execute(delete(Item).where(Item.name == key))
    else:
        item = session.get(Item, key)
        if item is None:
            session.add(Item(name=key, number=value))
        else:
            item.number = value
        session.flush()


def model_after(model: dict[str, int], scope_steps: list[Step]) -> dict[str, int] | None:
    """The model after the steps, or None if the database must reject them (duplicate insert)."""
    result = dict(model)
    for kind, key, value in scope_steps:
        if kind == "insert" and key in result:
            return None
        if kind == "delete":
            result.pop(key, None)
        else:
            result[key] = value
    return result


def items(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {str(k): int(v) for k, v in conn.execute(text("SELECT name, number FROM rel_item"))}


@pytest.mark.slow
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(scopes=scopes)
def test_random_units_of_work_match_an_in_memory_model(
    ledger: DbSessionFactory, other_connection: Engine, scopes: list[tuple[list[Step], Any]]
) -> None:
    with ledger.session_scope() as session:
        session.execute(delete(Item))
    model: dict[str, int] = {}
    for scope_steps, fail_at in scopes:
        after = model_after(model, scope_steps)
        try:
            with ledger.session_scope() as session:
                for step in scope_steps:
                    apply_step(session, step)
                if fail_at == "before_flush":
                    raise Injected
                session.flush()
                if fail_at == "after_flush":
                    raise Injected
                if fail_at == "before_commit":
                    fail_before_commit(session, Injected())
        except Injected:
            assert fail_at is not None
        except Exception:
            assert after is None  # only a duplicate insert may fail on its own
        else:
            assert fail_at is None and after is not None
            model = after
        assert items(other_connection) == model
    assert ledger.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
