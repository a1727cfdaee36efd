"""dbsession side by side with bare SQLAlchemy and the raw driver.

Run: ``python benchmarks/bench.py`` (``--help`` for backends and sizes).

Every measurement interleaves its variants round by round (in a shuffled order)
so that machine noise hits them alike, and reports the median of the rounds.

Baselines:
- ``sqlalchemy (matched)``: ``create_engine`` configured like dbsession's engine
  (pool_pre_ping, the same SQLite pragmas, SQLAlchemy-emitted ``BEGIN IMMEDIATE``,
  ``expire_on_commit=False``), used through ``with Session.begin()``. This is the
  fair comparison: it isolates what ``session_scope()`` itself costs.
- ``sqlalchemy (defaults)``: plain ``create_engine(url)`` and ``Session.begin()``.
- ``raw driver``: one sqlite3 / psycopg connection, hand-written SQL.
- async (section ``async``, SQLite file and PostgreSQL): ``sqlalchemy async (matched)``
  is ``create_async_engine`` configured the same way, used through
  ``async with async_sessionmaker.begin()``; ``raw async driver`` is one aiosqlite /
  psycopg ``AsyncConnection``.
- ``run_in_transaction()`` (sync and async) when nothing is retried is also compared
  with the plain scope, from the same interleaved rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import MetaData, String, create_engine, event, insert, select, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool

from dbsession import NAMING_CONVENTION, DbSessionFactory

PG_URL = os.environ.get(
    "DBSESSION_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1/test"
)
INSERT_SQL = {
    "sqlite": "INSERT INTO bench_row (name, value) VALUES (?, ?)",
    "postgresql": "INSERT INTO bench_row (name, value) VALUES (%s, %s)",
}
SELECT_SQL = {
    "sqlite": "SELECT name FROM bench_row WHERE id = ?",
    "postgresql": "SELECT name FROM bench_row WHERE id = %s",
}


class BenchBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Row(BenchBase):
    __tablename__ = "bench_row"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    value: Mapped[int]


# --- the three ways to reach a backend -------------------------------------------------


@dataclass
class Backend:
    """One database to measure against, and how to open each variant on it."""

    label: str
    url: URL

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    def dbsession(self) -> DbSessionFactory:
        return DbSessionFactory(self.url)

    def sqlalchemy(self, matched: bool, *, immediate: bool = True) -> sessionmaker[Session]:
        """A bare SQLAlchemy sessionmaker, configured like dbsession's (matched) or not.

        ``immediate=False`` keeps the matched SQLite setup but with a deferred ``BEGIN``.
        """
        url = self.url
        if matched and self.dialect == "sqlite" and not url.database:
            url = URL.create(
                "sqlite",
                database=f"file:/bench-{uuid.uuid4().hex}?vfs=memdb",
                query={"uri": "true"},
            )
        engine = create_engine(url, pool_pre_ping=matched)
        if matched and self.dialect == "sqlite":
            _sqlite_like_dbsession(engine, wal=bool(self.url.database))
            if immediate:
                engine = engine.execution_options(dbsession_begin="BEGIN IMMEDIATE")
        BenchBase.metadata.create_all(engine)
        return sessionmaker(engine, expire_on_commit=not matched)

    def raw(self) -> Any:
        """A raw DBAPI connection in manual-transaction mode."""
        if self.dialect == "sqlite":
            conn = sqlite3.connect(
                self.url.database or ":memory:",
                isolation_level=None,
                check_same_thread=False,
                timeout=5,
            )
            conn.execute("PRAGMA foreign_keys=ON")
            if self.url.database:
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS bench_row (id INTEGER PRIMARY KEY, "
                "name VARCHAR(40) NOT NULL, value INTEGER NOT NULL)"
            )
            return conn
        import psycopg

        return psycopg.connect(
            host=self.url.host,
            port=self.url.port or 5432,
            user=self.url.username,
            password=self.url.password,
            dbname=self.url.database,
        )


def _sqlite_like_dbsession(engine: Engine, *, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def configure(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()  # the aiosqlite adapter has no execute()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=5000")
        if wal:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def begin(connection: Any) -> None:
        connection.exec_driver_sql(
            connection.get_execution_options().get("dbsession_begin", "BEGIN")
        )


@contextmanager
def backends(names: list[str]) -> Iterator[list[Backend]]:
    """Create the requested databases (a temp SQLite file, a fresh PostgreSQL database)."""
    made: list[Backend] = []
    with tempfile.TemporaryDirectory() as folder:
        admin: Engine | None = None
        name = f"dbsession_bench_{uuid.uuid4().hex[:8]}"
        try:
            for backend in names:
                if backend == "sqlite-memory":
                    made.append(Backend(backend, URL.create("sqlite")))
                elif backend == "sqlite-file":
                    made.append(Backend(backend, URL.create("sqlite", database=f"{folder}/b.db")))
                elif backend == "postgresql":
                    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
                    with admin.connect() as conn:
                        conn.execute(text(f"CREATE DATABASE {name}"))
                    made.append(Backend(backend, make_url(PG_URL).set(database=name)))
            yield made
        finally:
            if admin is not None:
                with admin.connect() as conn:
                    conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


# --- measuring ----------------------------------------------------------------------------

Variant = Callable[[], float]  # runs one round, returns seconds per operation


def interleave(variants: dict[str, Variant], rounds: int) -> dict[str, float]:
    """Run every variant once per round in a shuffled order; median seconds per operation."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            gc.collect()  # garbage of the previous variant (100,000 ORM objects) is not billed here
            times[name].append(variants[name]())
    return {name: statistics.median(values) for name, values in times.items()}


def table(title: str, rows: list[tuple[str, str, float, float | None, str]]) -> None:
    """Print a markdown table: backend, variant, median, ratio, note."""
    print(f"\n### {title}\n")
    print("| backend | variant | median | ratio | note |")
    print("|---|---|---:|---:|---|")
    for backend, variant, seconds, ratio, note in rows:
        shown = f"{seconds * 1e6:,.0f} µs" if seconds < 0.01 else f"{seconds * 1e3:,.1f} ms"
        print(
            f"| {backend} | {variant} | {shown} | {'' if ratio is None else f'{ratio:.3f}x'} "
            f"| {note} |"
        )
    sys.stdout.flush()


def ratios(medians: dict[str, float], baseline: str) -> list[tuple[str, float, float]]:
    return [(name, value, value / medians[baseline]) for name, value in medians.items()]


# --- per unit of work ------------------------------------------------------------------------


def orm_unit(session: Session, i: int) -> None:
    row = Row(name=f"u{i}", value=i)
    session.add(row)
    session.flush()
    assert session.scalar(select(Row.name).where(Row.id == row.id)) == f"u{i}"


def bench_unit_of_work(backend: Backend, count: int, rounds: int) -> None:
    factory = backend.dbsession()
    BenchBase.metadata.create_all(factory.engine)
    matched, defaults, raw = backend.sqlalchemy(True), backend.sqlalchemy(False), backend.raw()
    insert_sql, select_sql = INSERT_SQL[backend.dialect], SELECT_SQL[backend.dialect]
    begin = "BEGIN IMMEDIATE" if backend.dialect == "sqlite" else None

    def scoped(make: Callable[[], AbstractContextManager[Session]]) -> Variant:
        def run() -> float:
            start = time.perf_counter()
            for i in range(count):
                with make() as session:
                    orm_unit(session, i)
            return (time.perf_counter() - start) / count

        return run

    def raw_run() -> float:
        start = time.perf_counter()
        for i in range(count):
            if begin:
                raw.execute(begin)
            cur = raw.execute(insert_sql + " RETURNING id", (f"u{i}", i))
            (row_id,) = cur.fetchone()
            assert raw.execute(select_sql, (row_id,)).fetchone()[0] == f"u{i}"
            raw.commit() if not begin else raw.execute("COMMIT")
        return (time.perf_counter() - start) / count

    def retried() -> float:
        start = time.perf_counter()
        for i in range(count):
            factory.run_in_transaction(orm_unit, i)
        return (time.perf_counter() - start) / count

    variants = {
        "session_scope()": scoped(factory.session_scope),
        "run_in_transaction()": retried,
        "sqlalchemy (matched)": scoped(matched.begin),
        "sqlalchemy (defaults)": scoped(defaults.begin),
        "raw driver": raw_run,
    }
    for variant in variants.values():  # warm up pools, caches and the statement cache
        variant()
    medians = interleave(variants, rounds)
    table(
        f"Unit of work (insert + select + commit) on {backend.label}, {count} per round, "
        f"{rounds} rounds; ratio vs sqlalchemy (matched)",
        [
            (backend.label, n, v, r, UOW_NOTES.get(n, ""))
            for n, v, r in ratios(medians, "sqlalchemy (matched)")
        ],
    )
    retry_overhead(backend.label, medians, "run_in_transaction()", "session_scope()")
    raw.close()
    factory.dispose()


UOW_NOTES = {
    "session_scope()": "target <= 1.05x",
    "async_session_scope()": "target <= 1.05x",
    "run_in_transaction()": "nothing retried",
    "async run_in_transaction()": "nothing retried",
}


def retry_overhead(label: str, medians: dict[str, float], retried: str, scope: str) -> None:
    """The one-line table: run_in_transaction against the plain scope, same rounds."""
    table(
        f"{retried} (nothing retried) vs {scope} on {label}, same rounds; ratio vs {scope}",
        [
            (label, n, medians[n], medians[n] / medians[scope], "target <= 1.05x" * (n == retried))
            for n in (retried, scope)
        ],
    )


# --- per unit of work, async ------------------------------------------------------------


async def async_orm_unit(session: AsyncSession, i: int) -> None:
    row = Row(name=f"u{i}", value=i)
    session.add(row)
    await session.flush()
    assert await session.scalar(select(Row.name).where(Row.id == row.id)) == f"u{i}"


async def raw_async(backend: Backend) -> Any:
    """A raw async DBAPI-level connection (aiosqlite / psycopg AsyncConnection)."""
    if backend.dialect == "sqlite":
        import aiosqlite

        conn = await aiosqlite.connect(backend.url.database, isolation_level=None, timeout=5)
        for pragma in ("PRAGMA foreign_keys=ON", "PRAGMA journal_mode=WAL"):
            await (await conn.execute(pragma)).close()  # an open cursor would hold a lock
        return conn
    import psycopg

    return await psycopg.AsyncConnection.connect(
        host=backend.url.host,
        port=backend.url.port or 5432,
        user=backend.url.username,
        password=backend.url.password,
        dbname=backend.url.database,
    )


def bench_async_unit_of_work(backend: Backend, count: int, rounds: int) -> None:
    """async_session_scope() vs a matched async_sessionmaker.begin() vs the raw async driver."""
    from dbsession.asyncio import AsyncDbSessionFactory

    loop = asyncio.new_event_loop()
    factory = AsyncDbSessionFactory(backend.url.set(drivername=backend.dialect))
    driver = "sqlite+aiosqlite" if backend.dialect == "sqlite" else "postgresql+psycopg"
    engine = create_async_engine(backend.url.set(drivername=driver), pool_pre_ping=True)
    if backend.dialect == "sqlite":
        _sqlite_like_dbsession(engine.sync_engine, wal=True)
        engine = engine.execution_options(dbsession_begin="BEGIN IMMEDIATE")
    matched = async_sessionmaker(engine, expire_on_commit=False)
    insert_sql, select_sql = INSERT_SQL[backend.dialect], SELECT_SQL[backend.dialect]
    sqlite = backend.dialect == "sqlite"

    def scoped(make: Callable[[], AbstractAsyncContextManager[AsyncSession]]) -> Variant:
        async def units() -> None:
            for i in range(count):
                async with make() as session:
                    await async_orm_unit(session, i)

        return lambda: timed_async(loop, units, count)

    async def retried() -> None:
        for i in range(count):
            await factory.run_in_transaction(async_orm_unit, i)

    async def raw_units() -> None:
        for i in range(count):
            if sqlite:
                await raw.execute("BEGIN IMMEDIATE")
            cur = await raw.execute(insert_sql + " RETURNING id", (f"u{i}", i))
            (row_id,) = await cur.fetchone()
            cur = await raw.execute(select_sql, (row_id,))
            assert (await cur.fetchone())[0] == f"u{i}"
            await (raw.execute("COMMIT") if sqlite else raw.commit())

    variants: dict[str, Variant] = {
        "async_session_scope()": scoped(factory.session_scope),
        "async run_in_transaction()": lambda: timed_async(loop, retried, count),
        "sqlalchemy async (matched)": scoped(matched.begin),
        "raw async driver": lambda: timed_async(loop, raw_units, count),
    }
    loop.run_until_complete(factory.create_all(BenchBase.metadata))
    raw = loop.run_until_complete(raw_async(backend))
    for variant in variants.values():  # warm up pools, caches and the statement cache
        variant()
    medians = interleave(variants, rounds)
    table(
        f"Async unit of work (insert + select + commit) on {backend.label}, {count} per round, "
        f"{rounds} rounds; ratio vs sqlalchemy async (matched)",
        [
            (backend.label, n, v, r, UOW_NOTES.get(n, ""))
            for n, v, r in ratios(medians, "sqlalchemy async (matched)")
        ],
    )
    retry_overhead(backend.label, medians, "async run_in_transaction()", "async_session_scope()")
    loop.run_until_complete(raw.close())
    loop.run_until_complete(engine.dispose())
    loop.run_until_complete(factory.dispose())
    loop.close()


def timed_async(
    loop: asyncio.AbstractEventLoop, units: Callable[[], Awaitable[None]], count: int
) -> float:
    """Seconds per unit of ``units()`` (``count`` of them), run to completion on ``loop``."""
    start = time.perf_counter()
    loop.run_until_complete(units())
    return (time.perf_counter() - start) / count


# --- bulk insert ---------------------------------------------------------------------------


def bench_bulk(backend: Backend, rows: int, rounds: int) -> None:
    factory = backend.dbsession()
    BenchBase.metadata.create_all(factory.engine)
    data = [{"name": f"b{i}", "value": i} for i in range(rows)]
    raw = backend.raw()
    insert_sql = INSERT_SQL[backend.dialect]

    def orm_count(sql: str) -> Any:
        with factory.session_scope() as session:
            result = session.execute(text(sql))
            return result.scalar() if result.returns_rows else None

    def raw_count(sql: str) -> Any:
        cursor = raw.execute(sql)
        result = cursor.fetchone() if cursor.description else None
        raw.commit()
        return result[0] if result else None

    def timed(body: Callable[[], None], run_sql: Callable[[str], Any] = orm_count) -> Variant:
        def run() -> float:
            run_sql("DELETE FROM bench_row")
            start = time.perf_counter()
            body()
            elapsed = time.perf_counter() - start
            assert run_sql("SELECT COUNT(*) FROM bench_row") == rows
            return elapsed

        return run

    def add_all() -> None:
        with factory.session_scope() as session:
            session.add_all(Row(**d) for d in data)

    def orm_insert() -> None:
        with factory.session_scope() as session:
            session.execute(insert(Row), data)

    def table_insert() -> None:
        with factory.session_scope() as session:
            session.execute(insert(Row.__table__), data)

    def core() -> None:
        with factory.engine.begin() as conn:
            conn.execute(insert(Row.__table__), data)

    def executemany() -> None:
        values = [(d["name"], d["value"]) for d in data]
        if backend.dialect == "sqlite":
            raw.execute("BEGIN IMMEDIATE")
            raw.executemany(insert_sql, values)
            raw.execute("COMMIT")
        else:
            with raw.cursor() as cur:
                cur.executemany(insert_sql, values)
            raw.commit()

    variants = {
        "ORM add_all (session_scope)": timed(add_all),
        "ORM insert(), list of dicts (session_scope)": timed(orm_insert),
        "insert(Table), list of dicts (session_scope)": timed(table_insert),
        "Core insert (engine.begin)": timed(core),
        "raw executemany": timed(executemany, raw_count),
    }
    medians = interleave(variants, rounds)
    table(
        f"Bulk insert of {rows:,} rows in one transaction on {backend.label}, {rounds} rounds; "
        "ratio vs Core",
        [
            (
                backend.label,
                n,
                v,
                r,
                "recommended; target <= 1.2x" if n.startswith("insert(Table)") else "",
            )
            for n, v, r in ratios(medians, "Core insert (engine.begin)")
        ],
    )
    raw.close()
    factory.dispose()


# --- concurrent writers --------------------------------------------------------------------


def bench_writers(backend: Backend, threads: int, per_thread: int) -> None:
    """Each writer reads then writes in one unit of work: the pattern that deadlocks SQLite."""
    factory = backend.dbsession()
    BenchBase.metadata.create_all(factory.engine)
    variants: dict[str, Callable[[], AbstractContextManager[Session]]] = {
        "session_scope()": factory.session_scope,
        "sqlalchemy (defaults)": backend.sqlalchemy(False).begin,
    }
    if backend.dialect == "sqlite":
        variants["sqlalchemy (matched, deferred BEGIN)"] = backend.sqlalchemy(
            True, immediate=False
        ).begin
    results = []
    for name, make in variants.items():
        errors: list[BaseException] = []

        def writer(
            number: int,
            make: Callable[[], AbstractContextManager[Session]] = make,
            errors: list[BaseException] = errors,
        ) -> None:
            for i in range(per_thread):
                try:
                    with make() as session:
                        top = session.scalar(select(Row.value).order_by(Row.id.desc()).limit(1))
                        session.add(Row(name=f"w{number}-{i}", value=(top or 0) + 1))
                except OperationalError as error:
                    errors.append(error)

        workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - start
        total = threads * per_thread
        results.append(
            (
                backend.label,
                name,
                elapsed / total,
                None,
                f"{(total - len(errors)) / elapsed:,.0f} commits/s, "
                f"{len(errors)} lock errors of {total}",
            )
        )
    table(
        f"{threads} concurrent writers x {per_thread} read-then-write units on {backend.label} "
        "(median = wall time per unit)",
        results,
    )
    factory.dispose()


# --- import time and first scope ------------------------------------------------------------


def fresh_interpreter(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


IMPORT = "import time; t = time.perf_counter(); import {}; print(time.perf_counter() - t)"
FIRST_SCOPE = """
import time
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker
from dbsession import DbSessionFactory
t = time.perf_counter()
{setup}
with {scope} as session:
    session.execute(text("SELECT 1"))
print(time.perf_counter() - t)
"""


def bench_startup(backend_list: list[Backend], rounds: int) -> None:
    variants: dict[str, Variant] = {
        "import sqlalchemy": lambda: fresh_interpreter(IMPORT.format("sqlalchemy")),
        "import sqlalchemy.orm": lambda: fresh_interpreter(IMPORT.format("sqlalchemy.orm")),
        "import dbsession": lambda: fresh_interpreter(IMPORT.format("dbsession")),
    }
    medians = interleave(variants, rounds)
    table(
        f"Import time in a fresh interpreter, {rounds} rounds; ratio vs import sqlalchemy.orm",
        [("-", n, v, r, "") for n, v, r in ratios(medians, "import sqlalchemy.orm")],
    )
    rows = []
    for backend in backend_list:
        url = backend.url.render_as_string(hide_password=False)
        first = {
            "session_scope()": FIRST_SCOPE.format(
                setup=f"f = DbSessionFactory({url!r})", scope="f.session_scope()"
            ),
            "sqlalchemy (defaults)": FIRST_SCOPE.format(
                setup=f"f = sessionmaker(create_engine({url!r}))", scope="f.begin()"
            ),
        }
        medians = interleave(
            {n: (lambda c=c: fresh_interpreter(c)) for n, c in first.items()}, rounds
        )
        rows += [
            (backend.label, n, v, r, "engine + connect + SELECT 1")
            for n, v, r in ratios(medians, "sqlalchemy (defaults)")
        ]
    table("First scope in a fresh interpreter, after the imports", rows)


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backends",
        default="sqlite-memory,sqlite-file,postgresql",
        help="comma-separated: sqlite-memory, sqlite-file, postgresql",
    )
    parser.add_argument(
        "--only",
        default="uow,async,bulk,writers,startup",
        help="comma-separated sections: uow, async, bulk, writers, startup",
    )
    parser.add_argument("--uow", type=int, default=300, help="units of work per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per measurement")
    parser.add_argument("--bulk-rows", type=int, default=100_000)
    parser.add_argument("--bulk-rounds", type=int, default=3)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--writes", type=int, default=100, help="units per writer thread")
    args = parser.parse_args()
    sections = set(args.only.split(","))
    import sqlalchemy

    print(
        f"Python {sys.version.split()[0]}, SQLAlchemy {sqlalchemy.__version__}, "
        f"SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs"
    )
    with backends(args.backends.split(",")) as backend_list:
        for backend in backend_list:
            if "uow" in sections:
                bench_unit_of_work(backend, args.uow, args.rounds)
            if "async" in sections and backend.label != "sqlite-memory":
                bench_async_unit_of_work(backend, args.uow, args.rounds)
            if "bulk" in sections:
                bench_bulk(backend, args.bulk_rows, args.bulk_rounds)
            if "writers" in sections and backend.label != "sqlite-memory":
                bench_writers(backend, args.writers, args.writes)
        if "startup" in sections:
            bench_startup([b for b in backend_list if b.label != "sqlite-memory"], args.rounds)


if __name__ == "__main__":
    main()
