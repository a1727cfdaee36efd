"""Through a real PgBouncer in transaction mode: never the wrong statement, the wrong row or
the wrong column (psycopg's prepared statements are off), and the rest of dbsession
(savepoints, SERIALIZABLE retries, read-only scopes, pre-ping, a KILL + RESUME) works."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from deploy_fixtures import Bouncer
from sqlalchemy import Integer, String, Table, create_engine, insert, inspect, select, text, update
from sqlalchemy.engine import URL, Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool
from test_reliability import run_threads

from dbsession import DbSessionFactory, ReadOnlyError, RetryPolicy
from dbsession.asyncio import AsyncDbSessionFactory
from dbsession.errors import ConnectionLostError, ScopeTimeoutError

THREADS = 8
UNITS = 200
ROWS = 4
COLUMNS = [f"c{n}" for n in range(THREADS)]
RETRY = RetryPolicy(attempts=20)


class Shapes(DeclarativeBase):
    pass


class _Shaped:
    """Two tables of the same shape: a statement of one runs on the other without error."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))
    c0: Mapped[int] = mapped_column(Integer, default=0)
    c1: Mapped[int] = mapped_column(Integer, default=0)
    c2: Mapped[int] = mapped_column(Integer, default=0)
    c3: Mapped[int] = mapped_column(Integer, default=0)
    c4: Mapped[int] = mapped_column(Integer, default=0)
    c5: Mapped[int] = mapped_column(Integer, default=0)
    c6: Mapped[int] = mapped_column(Integer, default=0)
    c7: Mapped[int] = mapped_column(Integer, default=0)


class Left(_Shaped, Shapes):
    __tablename__ = "pool_left"


class Right(_Shaped, Shapes):
    __tablename__ = "pool_right"


PAIRS: tuple[tuple[type[_Shaped], type[_Shaped]], ...] = ((Left, Right), (Right, Left))
MODELS: tuple[type[_Shaped], ...] = (Left, Right)


def table_of(model: type[_Shaped]) -> Table:
    table: Table = inspect(model).local_table
    return table


@pytest.fixture
def direct(postgresql_url: URL) -> Iterator[Engine]:
    """The shaped tables, ROWS rows each, on the test server (reached directly)."""
    engine = create_engine(postgresql_url, poolclass=NullPool)
    Shapes.metadata.drop_all(engine)
    Shapes.metadata.create_all(engine)
    with engine.begin() as conn:
        for model in MODELS:
            table = table_of(model)
            rows = [
                {"id": row, "kind": table.name, **dict.fromkeys(COLUMNS, 0)}
                for row in range(1, ROWS + 1)
            ]
            conn.execute(insert(table), rows)
    yield engine
    Shapes.metadata.drop_all(engine)
    engine.dispose()


def _unit(session: Session, thread: int, i: int, wrong: list[str]) -> None:
    """Read-modify-write this thread's column of one row through the ORM, and add one to
    it in the same row of the other table with a Core UPDATE."""
    model, other = PAIRS[i % 2]
    row = i % ROWS + 1
    column = COLUMNS[thread]
    found = session.get(model, row)
    if found is None or found.id != row or found.kind != table_of(model).name:
        wrong.append(f"get({model.__name__}, {row}) gave {found and (found.kind, found.id)}")
        return
    setattr(found, column, getattr(found, column) + 1)
    table = table_of(other)
    result: Any = session.execute(
        update(table).where(table.c.id == row).values({column: table.c[column] + 1})
    )
    if result.rowcount != 1:
        wrong.append(f"UPDATE {other.__name__} {row} {column}: rowcount {result.rowcount}")


def _assert_counts(engine: Engine, done: Counter[tuple[int, int]]) -> None:
    """Each cell holds exactly the committed units of its thread on its row, both tables."""
    for model in MODELS:
        with Session(engine) as session:
            for found in session.scalars(select(model)):
                for thread, column in enumerate(COLUMNS):
                    assert (model.__name__, found.id, column, getattr(found, column)) == (
                        model.__name__,
                        found.id,
                        column,
                        done[thread, found.id],
                    )


def test_8_threads_x_200_units_through_transaction_pooling_never_touch_a_wrong_row(
    pgbouncer: Bouncer, postgresql_url: URL, direct: Engine
) -> None:
    factory = DbSessionFactory(pgbouncer.url(postgresql_url), pooler="transaction")
    wrong: list[str] = []
    errors: list[BaseException] = []
    done: Counter[tuple[int, int]] = Counter()
    lock = threading.Lock()

    def worker(thread: int) -> None:
        for i in range(UNITS):
            try:
                factory.transactional(retry=RETRY)(_unit)(thread, i, wrong)
            except Exception as error:
                errors.append(error)
                continue
            with lock:
                done[thread, i % ROWS + 1] += 1

    try:
        run_threads(worker, THREADS)
    finally:
        factory.dispose()
    assert errors == [] and wrong == []
    _assert_counts(direct, done)


async def _async_unit(session: AsyncSession, thread: int, i: int, wrong: list[str]) -> None:
    await session.run_sync(_unit, thread, i, wrong)


def test_8_tasks_x_200_units_async_through_transaction_pooling_never_touch_a_wrong_row(
    pgbouncer: Bouncer, postgresql_url: URL, direct: Engine
) -> None:
    wrong: list[str] = []
    errors: list[BaseException] = []
    done: Counter[tuple[int, int]] = Counter()

    async def main() -> None:
        factory = AsyncDbSessionFactory(pgbouncer.url(postgresql_url), pooler="transaction")

        async def worker(thread: int) -> None:
            for i in range(UNITS):
                try:
                    await factory.transactional(retry=RETRY)(_async_unit)(thread, i, wrong)
                except Exception as error:
                    errors.append(error)
                    continue
                done[thread, i % ROWS + 1] += 1

        try:
            await asyncio.gather(*(worker(thread) for thread in range(THREADS)))
        finally:
            await factory.dispose()

    asyncio.run(main())
    assert errors == [] and wrong == []
    _assert_counts(direct, done)


@pytest.fixture
def pooled(pgbouncer: Bouncer, postgresql_url: URL, direct: Engine) -> Iterator[DbSessionFactory]:
    """A factory reaching the shaped tables through the transaction-mode PgBouncer."""
    factory = DbSessionFactory(pgbouncer.url(postgresql_url), pooler="transaction")
    yield factory
    factory.dispose()


def _c0(engine: Engine, row: int = 1) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(text("SELECT c0 FROM pool_left WHERE id = :id"), {"id": row}))


def test_savepoints_work_through_transaction_pooling(
    pooled: DbSessionFactory, direct: Engine
) -> None:
    with pooled.session_scope() as session:
        session.execute(text("UPDATE pool_left SET c0 = 1 WHERE id = 1"))
        with pytest.raises(RuntimeError), session.begin_nested():
            session.execute(text("UPDATE pool_left SET c0 = 99 WHERE id = 1"))
            raise RuntimeError("roll back to the savepoint")
        with session.begin_nested():
            session.execute(text("UPDATE pool_left SET c0 = c0 + 1 WHERE id = 1"))
    assert _c0(direct) == 2


def test_serializable_conflicts_are_retried_through_transaction_pooling(
    pooled: DbSessionFactory, direct: Engine
) -> None:
    def increment(session: Session) -> None:
        value = session.scalar(text("SELECT c0 FROM pool_left WHERE id = 1"))
        session.execute(text("UPDATE pool_left SET c0 = :v WHERE id = 1"), {"v": value + 1})

    def worker(number: int) -> None:
        for _ in range(15):
            pooled.transactional(retry=RetryPolicy(attempts=100), isolation_level="SERIALIZABLE")(
                increment
            )()

    run_threads(worker, 4)
    assert _c0(direct) == 60


def test_read_only_scopes_work_through_transaction_pooling(pooled: DbSessionFactory) -> None:
    with pooled.session_scope(readonly=True) as session:
        assert session.scalar(text("SELECT count(*) FROM pool_left")) == ROWS
    with pytest.raises(ReadOnlyError), pooled.session_scope(readonly=True) as session:
        session.execute(text("UPDATE pool_left SET c0 = 5"))
    with pooled.session_scope() as session:  # the server session is not left read-only
        session.execute(text("UPDATE pool_left SET c0 = 5"))


def test_kill_and_resume_in_pgbouncer_pre_ping_recovers_and_a_unit_in_flight_fails_named(
    pgbouncer: Bouncer, pooled: DbSessionFactory, postgresql_url: URL, direct: Engine
) -> None:
    database = postgresql_url.database
    with pooled.session_scope() as session:  # a pooled client connection now exists
        session.execute(text("UPDATE pool_left SET c0 = 1 WHERE id = 1"))
    pgbouncer.admin(f"KILL {database}")
    pgbouncer.admin(f"RESUME {database}")
    with pooled.session_scope() as session:  # pre-ping drops the dead one, reconnects
        session.execute(text("UPDATE pool_left SET c0 = c0 + 1 WHERE id = 1"))
    assert _c0(direct) == 2

    with pytest.raises(ConnectionLostError) as raised:
        with pooled.session_scope() as session:
            session.execute(text("UPDATE pool_left SET c0 = 100 WHERE id = 1"))
            pgbouncer.admin(f"KILL {database}")
            pgbouncer.admin(f"RESUME {database}")
            session.execute(text("SELECT 1"))
    assert "was lost" in str(raised.value) and raised.value.connection_invalidated
    assert _c0(direct) == 2  # the unit in flight did not commit
    with pooled.session_scope() as session:
        assert session.scalar(text("SELECT c0 FROM pool_left WHERE id = 1")) == 2


def test_scope_timeout_through_transaction_pooling_stays_in_its_transaction(
    pooled: DbSessionFactory,
) -> None:
    with pytest.raises(ScopeTimeoutError):
        with pooled.session_scope(timeout=0.5) as session:
            session.execute(text("SELECT pg_sleep(5)"))
    for _ in range(3):  # SET LOCAL ended with its transaction: no server session keeps it
        with pooled.session_scope() as session:
            session.execute(text("SELECT pg_sleep(0.7)"))
