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
import datetime
import gc
import importlib.metadata
import itertools
import operator
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

import headline
from sqlalchemy import MetaData, String, create_engine, event, func, insert, select, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool

from dbsession import NAMING_CONVENTION, DbSessionFactory

PG_URL = os.environ.get(
    "DBSESSION_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1/test"
)
MARIADB_URL = os.environ.get(
    "DBSESSION_BENCH_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test"
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


class WideRow(BenchBase):
    """The 6-column table of the bulk_insert section: mixed types, one nullable."""

    __tablename__ = "bench_wide"
    id: Mapped[int] = mapped_column(primary_key=True)
    n: Mapped[int]
    name: Mapped[str] = mapped_column(String(40))
    price: Mapped[float]
    day: Mapped[datetime.date]
    active: Mapped[bool]
    note: Mapped[str | None] = mapped_column(String(40))


class Counter(BenchBase):
    """A hot row for the lost-update table."""

    __tablename__ = "bench_counter"
    id: Mapped[int] = mapped_column(primary_key=True)
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
        maria: Engine | None = None
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
                elif backend == "mariadb":
                    maria = create_engine(
                        MARIADB_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool
                    )
                    with maria.connect() as conn:
                        conn.execute(text(f"CREATE DATABASE {name}"))
                    made.append(Backend(backend, make_url(MARIADB_URL).set(database=name)))
            yield made
        finally:
            if maria is not None:
                with maria.connect() as conn:
                    conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
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


def run_threads(target: Callable[[int], None], threads: int) -> float:
    """Run ``target(0)`` ... ``target(threads - 1)`` in threads at once; wall seconds."""
    workers = [threading.Thread(target=target, args=(n,)) for n in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - start


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

        elapsed = run_threads(writer, threads)
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


# --- against SQLAlchemy's defaults, and other wrappers ---------------------------------------

UNITS = ("get", "insert", "read-modify-write")
SEED = 100


def unit_body(kind: str, session: Session, i: int) -> None:
    """One unit of work's body: a lookup by key, a new row, or a read-modify-write."""
    if kind == "insert":
        session.add(Row(name=f"d{i}", value=i))
        return
    row = session.get(Row, i % SEED + 1)
    assert row is not None
    if kind == "get":
        assert row.name
    else:
        row.value += 1


def seed(engine: Any) -> None:
    """The rows ``unit_body`` reads: ids 1 to SEED (whatever ran on the table before)."""
    BenchBase.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        have = set(session.scalars(select(Row.id).where(Row.id <= SEED)))
        session.add_all(
            Row(id=i, name=f"seed{i}", value=0) for i in range(1, SEED + 1) if i not in have
        )
        session.flush()
        if engine.dialect.name == "postgresql":  # explicit ids do not move the sequence
            session.execute(
                text(
                    "SELECT setval(pg_get_serial_sequence('bench_row', 'id'), "
                    "(SELECT max(id) FROM bench_row))"
                )
            )


Scope = Callable[[], AbstractContextManager[Session]]


def wrappers(backend: Backend) -> tuple[dict[str, Scope], Callable[[], None]]:
    """Every way to open one unit of work on ``backend`` out of the box: dbsession,
    SQLAlchemy's defaults, and (if installed: the ``bench`` extra) Flask-SQLAlchemy,
    SQLModel and advanced-alchemy as their docs show. Returns them and a closer."""
    factory = backend.dbsession()
    seed(factory.engine)
    bare = sessionmaker(create_engine(backend.url))
    seed(bare.kw["bind"])
    scopes: dict[str, Scope] = {
        "sqlalchemy (defaults)": bare.begin,
        "dbsession session_scope()": factory.session_scope,
    }
    closers: list[Callable[[], None]] = [factory.dispose, bare.kw["bind"].dispose]
    if backend.dialect == "postgresql":  # out of the box, prepared statements wait for pooler=
        direct = DbSessionFactory(backend.url, pooler="none")
        scopes["dbsession session_scope(), pooler='none'"] = direct.session_scope
        closers.append(direct.dispose)
    url = backend.url.render_as_string(hide_password=False)
    try:
        from flask import Flask
        from flask_sqlalchemy import SQLAlchemy
    except ImportError:
        pass
    else:
        app = Flask("bench")
        app.config["SQLALCHEMY_DATABASE_URI"] = url
        db = SQLAlchemy(app)
        with app.app_context():
            seed(db.engine)
            closers.append(db.engine.dispose)

        @contextmanager
        def flask_request() -> Iterator[Session]:
            with app.app_context():  # one request: session removed at teardown
                yield db.session
                db.session.commit()

        scopes["Flask-SQLAlchemy (app context)"] = flask_request
    try:
        import sqlmodel
    except ImportError:
        pass
    else:
        sm_engine = sqlmodel.create_engine(url)
        seed(sm_engine)
        closers.append(sm_engine.dispose)

        @contextmanager
        def sqlmodel_session() -> Iterator[Session]:
            with sqlmodel.Session(sm_engine) as session:
                yield session
                session.commit()

        scopes["SQLModel Session"] = sqlmodel_session
    try:
        from advanced_alchemy.config import SQLAlchemySyncConfig
    except ImportError:
        pass
    else:
        config = SQLAlchemySyncConfig(connection_string=url)
        seed(config.get_engine())
        closers.append(config.get_engine().dispose)

        @contextmanager
        def aa_session() -> Iterator[Session]:
            with config.get_session() as session:
                yield session
                session.commit()

        scopes["advanced-alchemy get_session()"] = aa_session

    def close() -> None:
        for closer in closers:
            closer()

    return scopes, close


def interleave_cpu(
    variants: dict[str, Callable[[], None]], count: int, rounds: int
) -> dict[str, tuple[float, float]]:
    """Like ``interleave``: median wall and CPU (process) seconds per operation."""
    walls: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            variants[name]()
            walls[name].append((time.perf_counter() - wall) / count)
            cpus[name].append((time.process_time() - cpu) / count)
    return {n: (statistics.median(walls[n]), statistics.median(cpus[n])) for n in variants}


def bench_defaults(backend: Backend, count: int, rounds: int) -> None:
    """session_scope() (and the other wrappers) against plain create_engine(url) + Session."""
    scopes, close = wrappers(backend)
    rows = []
    for kind in UNITS:
        variants: dict[str, Callable[[], None]] = {}
        for name, scope in scopes.items():

            def run(scope: Scope = scope, kind: str = kind) -> None:
                for i in range(count):
                    with scope() as session:
                        unit_body(kind, session, i)

            variants[name] = run
        for variant in variants.values():
            variant()  # warm-up
        medians = interleave_cpu(variants, count, rounds)
        wall0, cpu0 = medians["sqlalchemy (defaults)"]
        for name, (wall, cpu) in medians.items():
            rows.append((kind, name, wall, wall / wall0, cpu, cpu / cpu0))
    print(
        f"\n### Against SQLAlchemy's defaults on {backend.label}: {count} units per round, "
        f"{rounds} rounds interleaved; ratios vs `create_engine(url)` + `Session.begin()`\n"
    )
    print("| unit | variant | wall | wall ratio | CPU | CPU ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for kind, name, wall, wall_ratio, cpu, cpu_ratio in rows:
        print(
            f"| {kind} | {name} | {wall * 1e6:,.0f} µs | {wall_ratio:.3f}x | "
            f"{cpu * 1e6:,.0f} µs | {cpu_ratio:.3f}x |"
        )
    sys.stdout.flush()
    close()


# --- bulk_insert ----------------------------------------------------------------------------


def _wide_row(i: int) -> dict[str, Any]:
    return {
        "n": i,
        "name": f"w\\t{i}\\n",
        "price": i * 0.25,
        "day": datetime.date(2020, 1, 1) + datetime.timedelta(days=i % 3650),
        "active": i % 3 == 0,
        "note": None if i % 2 else f"note {i}",
    }


#: The two table shapes: the 2-column ``bench_row`` and the 6-column ``bench_wide``.
BULK_SHAPES: dict[str, tuple[Any, Callable[[int], dict[str, Any]]]] = {
    "2 columns (text, int)": (Row.__table__, lambda i: {"name": f"b\\t{i}\\n", "value": i}),
    "6 columns (int, text, float, date, bool, nullable text)": (WideRow.__table__, _wide_row),
}


RawLoad = Callable[[Any, str, list[str], list[Any]], None]


def _raw_bulk(backend: Backend) -> tuple[Any, dict[str, RawLoad]]:
    """A raw driver connection and the plain ways to load rows on it in one transaction:
    psycopg's COPY with ``write_row``; sqlite3's and PyMySQL's ``executemany`` of a
    one-row INSERT (PyMySQL rewrites it into multi-row statements); on SQLite also the
    multi-row VALUES pages bulk_insert sends, by hand. The rows arrive as the dicts a
    user has: making them tuples (``operator.itemgetter``) is part of the timing."""
    if backend.dialect == "sqlite":
        sqlite3.register_adapter(datetime.date, _adapt_date_iso)

        def sqlite_load(conn: Any, name: str, keys: list[str], rows: list[Any]) -> None:
            values = list(map(operator.itemgetter(*keys), rows))
            marks = ", ".join("?" * len(keys))
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(f"INSERT INTO {name} ({', '.join(keys)}) VALUES ({marks})", values)
            conn.execute("COMMIT")

        def sqlite_pages(conn: Any, name: str, keys: list[str], rows: list[Any]) -> None:
            row_of, one = operator.itemgetter(*keys), f"({', '.join('?' * len(keys))})"
            conn.execute("BEGIN IMMEDIATE")
            for start in range(0, len(rows), 1000):
                page = list(map(row_of, rows[start : start + 1000]))
                sql = f"INSERT INTO {name} ({', '.join(keys)}) VALUES " + ", ".join(
                    [one] * len(page)
                )
                conn.execute(sql, tuple(itertools.chain.from_iterable(page)))
            conn.execute("COMMIT")

        return backend.raw(), {"raw": sqlite_load, "raw pages": sqlite_pages}
    if backend.dialect == "postgresql":

        def copy_load(conn: Any, name: str, keys: list[str], rows: list[Any]) -> None:
            row_of = operator.itemgetter(*keys)
            with conn.cursor() as cur, cur.copy(f"COPY {name} ({', '.join(keys)}) FROM STDIN") as c:
                for row in rows:
                    c.write_row(row_of(row))
            conn.commit()

        return backend.raw(), {"raw": copy_load}
    import pymysql  # type: ignore[import-untyped]

    def mysql_load(conn: Any, name: str, keys: list[str], rows: list[Any]) -> None:
        values = list(map(operator.itemgetter(*keys), rows))
        marks = ", ".join(["%s"] * len(keys))
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {name} ({', '.join(keys)}) VALUES ({marks})", values)
        conn.commit()

    url = backend.url
    connection = pymysql.connect(
        host=url.host,
        port=url.port or 3306,
        user=url.username,
        password=url.password or "",
        database=url.database,
    )
    return connection, {"raw": mysql_load}


def _adapt_date_iso(value: datetime.date) -> str:
    """sqlite3's adapter recipe for dates (Python docs; its default adapter is deprecated)."""
    return value.isoformat()


def bench_bulk_insert(backend: Backend, rows: int, rounds: int) -> dict[str, float]:
    """dbsession.bulk_insert side by side with the executemany it replaces
    (``session.execute(insert(Table), rows)`` in a scope) and the raw driver's plain
    load in one transaction, at two table shapes: interleaved rounds, medians, the date
    and the load average."""
    factory = backend.dbsession()
    BenchBase.metadata.create_all(factory.engine)
    raw, raw_loads = _raw_bulk(backend)
    load = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = [
        (
            shape,
            _bulk_shape(factory, raw, raw_loads, table_, [make(i) for i in range(rows)], rounds),
        )
        for shape, (table_, make) in BULK_SHAPES.items()
    ]
    print(
        f"\n### bulk_insert of {rows:,} rows on {backend.label}: {rounds} interleaved rounds, "
        f"medians; {started}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        f"(after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}); {_driver_version(backend)}\n"
    )
    print(
        "| backend | table | `session.execute(insert(T), rows)` | `bulk_insert` | raw driver "
        "| bulk_insert / raw | executemany / bulk_insert |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape, m in results:
        print(
            f"| {backend.label} | {shape} | {m['executemany']:.3f} s | {m['bulk_insert']:.3f} s "
            f"| {m['raw']:.3f} s | **{m['bulk_insert'] / m['raw']:.2f}x** "
            f"| {m['executemany'] / m['bulk_insert']:.1f}x |"
        )
    for shape, m in results:
        if "raw pages" in m:
            print(
                f"\n{backend.label}, {shape}: raw sqlite3 sending the same 1,000-row VALUES "
                f"pages by hand: {m['raw pages']:.3f} s (bulk_insert / that: "
                f"{m['bulk_insert'] / m['raw pages']:.2f}x)"
            )
    sys.stdout.flush()
    raw.close()
    with factory.session_scope() as session:  # the seeded rows, for the sections after
        session.execute(text("DELETE FROM bench_row"))
    seed(factory.engine)
    factory.dispose()
    return {  # the headline cells: bulk_insert / raw driver
        f"{backend.label}:{shape}": round(m["bulk_insert"] / m["raw"], 2) for shape, m in results
    }


def _bulk_shape(
    factory: DbSessionFactory,
    raw: Any,
    raw_loads: dict[str, RawLoad],
    table_: Any,
    data: list[dict[str, Any]],
    rounds: int,
) -> dict[str, float]:
    """Median seconds of each contender loading ``data`` into the empty ``table_``."""
    from dbsession._bulk import bulk_insert

    keys = list(data[0])
    empty = "DELETE FROM" if factory.engine.dialect.name == "sqlite" else "TRUNCATE TABLE"

    def timed(body: Callable[[], Any]) -> Variant:
        def run() -> float:
            with factory.session_scope() as session:
                session.execute(text(f"{empty} {table_.name}"))
            start = time.perf_counter()
            body()
            elapsed = time.perf_counter() - start
            with factory.session_scope() as session:
                assert session.scalar(select(func.count()).select_from(table_)) == len(data)
            return elapsed

        return run

    def executemany() -> None:
        with factory.session_scope() as session:
            session.execute(insert(table_), data)

    def bulk() -> None:
        with factory.session_scope() as session:
            bulk_insert(session, table_, data)

    def by_hand(raw_load: RawLoad) -> Variant:
        return timed(lambda: raw_load(raw, table_.name, keys, data))

    variants = {"executemany": timed(executemany), "bulk_insert": timed(bulk)}
    variants.update({name: by_hand(raw_load) for name, raw_load in raw_loads.items()})
    return interleave(variants, rounds)


def _driver_version(backend: Backend) -> str:
    if backend.dialect == "postgresql":
        import psycopg

        return f"psycopg {psycopg.__version__} (COPY)"
    if backend.dialect == "sqlite":
        return f"sqlite3, SQLite {sqlite3.sqlite_version}"
    return f"PyMySQL {importlib.metadata.version('PyMySQL')}"


# --- pool size ------------------------------------------------------------------------------


def bench_pool(backend: Backend, threads: int, per_thread: int, rounds: int) -> None:
    """Bursts of ``threads`` threads doing get units at once, with a quiet moment between
    bursts (as between a web app's peaks), on one factory per pool: units per second, and
    connections opened over all the bursts, with SQLAlchemy's pool (5 + 10 overflow)
    and dbsession's (10 + 5). Overflow connections are closed when they come back to a
    full pool, so each burst above the pool size reopens them."""
    pools = {
        "5 + 10 overflow (SQLAlchemy's default)": {"pool_size": 5, "max_overflow": 10},
        "10 + 5 overflow (dbsession's default)": {},
    }
    factories = {name: DbSessionFactory(backend.url, **options) for name, options in pools.items()}
    opened: dict[str, list[int]] = {name: [] for name in pools}
    rates: dict[str, list[float]] = {name: [] for name in pools}
    for name, factory in factories.items():
        seed(factory.engine)
        event.listen(factory.engine, "connect", lambda *_, seen=opened[name]: seen.append(1))
    for _ in range(rounds):
        for name in random.sample(list(pools), len(pools)):
            factory = factories[name]
            start = threading.Barrier(threads)

            def work(number: int, factory: DbSessionFactory = factory, start: Any = start) -> None:
                start.wait()
                for i in range(per_thread):
                    with factory.session_scope() as session:
                        unit_body("get", session, i)

            rates[name].append(threads * per_thread / run_threads(work, threads))
    print(
        f"\n### Pool: {rounds} bursts of {threads} threads x {per_thread} get units on "
        f"{backend.label}, one factory per pool\n"
    )
    print("| backend | pool | units/s (median burst) | connections opened, all bursts |")
    print("|---|---|---:|---:|")
    for name in pools:
        print(
            f"| {backend.label} | {name} | {statistics.median(rates[name]):,.0f} "
            f"| {len(opened[name])} |"
        )
        factories[name].dispose()
    sys.stdout.flush()


# --- lost updates ---------------------------------------------------------------------------


def bench_lost_updates(backend: Backend, threads: int, per_thread: int, hot: int) -> None:
    """``threads`` threads each add 1 to a random one of ``hot`` rows ``per_thread`` times
    (read, then write): how many increments were lost, how many units failed."""
    factory = backend.dbsession()
    BenchBase.metadata.create_all(factory.engine)
    bare = sessionmaker(create_engine(backend.url))

    def increment(session: Session, key: int, lock: bool) -> None:
        counter = session.get(Counter, key, with_for_update=lock)
        assert counter is not None
        counter.value += 1

    attempts: list[int] = []

    def serializable(session: Session, key: int) -> None:
        attempts.append(1)
        increment(session, key, False)

    patterns: dict[str, Callable[[int], None]] = {}

    def scoped(make: Scope, lock: bool) -> Callable[[int], None]:
        def one(key: int) -> None:
            with make() as session:
                increment(session, key, lock)

        return one

    patterns["sqlalchemy (defaults)"] = scoped(bare.begin, False)
    patterns["session_scope()"] = scoped(factory.session_scope, False)
    patterns["session_scope() + with_for_update()"] = scoped(factory.session_scope, True)
    patterns["run_in_transaction(isolation_level='SERIALIZABLE')"] = lambda key: (
        factory.run_in_transaction(serializable, key, isolation_level="SERIALIZABLE")
    )
    rows = []
    for name, one in patterns.items():
        with factory.session_scope() as session:
            session.execute(text("DELETE FROM bench_counter"))
            session.add_all(Counter(id=k, value=0) for k in range(1, hot + 1))
        attempts.clear()
        done: list[int] = []
        errors: list[str] = []

        def work(
            number: int,
            one: Callable[[int], None] = one,
            done: list[int] = done,
            errors: list[str] = errors,
        ) -> None:
            pick = random.Random(number)
            for _ in range(per_thread):
                try:
                    one(pick.randint(1, hot))
                    done.append(1)
                except Exception as error:  # counted: lock errors, exhausted retries
                    errors.append(type(error).__name__)

        elapsed = run_threads(work, threads)
        with factory.session_scope(readonly=True) as session:
            total = session.scalar(select(func.sum(Counter.value))) or 0
        retries = len(attempts) - len(done) if attempts else 0
        kinds = ", ".join(sorted(set(errors)))
        rows.append(
            (name, len(done), len(done) - total, len(errors), kinds, retries, len(done) / elapsed)
        )
    print(
        f"\n### Lost updates: {threads} threads x {per_thread} read-modify-write units on "
        f"{hot} hot rows, {backend.label}\n"
    )
    print("| backend | pattern | committed | lost updates | failed units | retries | units/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, committed, lost, failed, kinds, retries, rate in rows:
        shown = f"{failed} ({kinds})" if failed else "0"
        print(
            f"| {backend.label} | {name} | {committed} | {lost} | {shown} | {retries} "
            f"| {rate:,.0f} |"
        )
    sys.stdout.flush()
    bare.kw["bind"].dispose()
    factory.dispose()


# --- the pytest plugin's per-test cost ------------------------------------------------------


def bench_plugin(backend: Backend, count: int, rounds: int) -> None:
    """The plugin's db_session set-up and tear-down around one insert, against the
    savepoint fixture of SQLAlchemy's docs ("Joining a Session into an External Transaction")."""
    from dbsession.testing import _as_is, _Connections, _Hooks, _rolled_back_session

    factory = backend.dbsession()
    BenchBase.metadata.create_all(factory.engine)
    engine = factory.engine
    connections = _Connections()  # as in the plugin: one connection kept from test to test

    def plugin() -> float:
        start = time.perf_counter()
        for i in range(count):
            fixture = _rolled_back_session(factory, _as_is, _Hooks(), "db_session", connections)
            session = next(fixture)
            unit_body("insert", session, i)
            session.flush()
            fixture.close()
        return (time.perf_counter() - start) / count

    def recipe() -> float:
        start = time.perf_counter()
        for i in range(count):
            connection = engine.connect()
            transaction = connection.begin()
            session = Session(bind=connection, join_transaction_mode="create_savepoint")
            unit_body("insert", session, i)
            session.flush()
            session.close()
            transaction.rollback()
            connection.close()
        return (time.perf_counter() - start) / count

    variants = {"SQLAlchemy docs savepoint fixture": recipe, "dbsession db_session": plugin}
    for variant in variants.values():
        variant()
    medians = interleave(variants, rounds)
    table(
        f"Per-test cost of the pytest plugin on {backend.label} (set-up, one insert, "
        f"tear-down), {count} per round, {rounds} rounds; ratio vs the docs' fixture",
        [
            (backend.label, n, v, r, "target <= 1.1x" * (n == "dbsession db_session"))
            for n, v, r in ratios(medians, "SQLAlchemy docs savepoint fixture")
        ],
    )
    connections.release(factory, _as_is)
    factory.dispose()


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backends",
        default="sqlite-memory,sqlite-file,postgresql,mariadb",
        help="comma-separated: sqlite-memory, sqlite-file, postgresql, mariadb",
    )
    parser.add_argument(
        "--only",
        default="defaults,bulkpath,pool,lost,plugin,uow,async,bulk,writers,startup",
        help="comma-separated sections: defaults (vs SQLAlchemy's defaults and other "
        "wrappers), bulkpath (bulk_insert), pool, lost (lost updates), plugin, uow, async, "
        "bulk, writers, startup; instruction counts per unit are benchmarks/units.py",
    )
    parser.add_argument("--uow", type=int, default=300, help="units of work per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per measurement")
    parser.add_argument("--bulk-rows", type=int, default=100_000)
    parser.add_argument("--bulk-rounds", type=int, default=3)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--writes", type=int, default=100, help="units per writer thread")
    parser.add_argument("--hot-rows", type=int, default=4, help="rows of the lost-update table")
    parser.add_argument(
        "--check", action="store_true", help="bulkpath: compare with headline.json (exit 1)"
    )
    parser.add_argument("--record", action="store_true", help="bulkpath: write headline.json")
    args = parser.parse_args()
    sections = set(args.only.split(","))
    import sqlalchemy

    print(
        f"Python {sys.version.split()[0]}, SQLAlchemy {sqlalchemy.__version__}, "
        f"SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs"
    )
    bulk_cells: dict[str, float] = {}
    with backends(args.backends.split(",")) as backend_list:
        for backend in backend_list:
            classic = backend.label != "mariadb"  # sections with a raw-driver baseline
            if "defaults" in sections:
                bench_defaults(backend, args.uow, args.rounds)
            if "plugin" in sections:
                bench_plugin(backend, args.uow, args.rounds)
            if "bulkpath" in sections and backend.label != "sqlite-memory":
                bulk_cells.update(bench_bulk_insert(backend, args.bulk_rows, args.bulk_rounds))
            if "pool" in sections and backend.label != "sqlite-memory":
                bench_pool(backend, args.writers, args.writes, args.rounds)
            if "lost" in sections and backend.label != "sqlite-memory":
                bench_lost_updates(backend, args.writers, args.writes // 2, args.hot_rows)
            if "uow" in sections and classic:
                bench_unit_of_work(backend, args.uow, args.rounds)
            if "async" in sections and classic and backend.label != "sqlite-memory":
                bench_async_unit_of_work(backend, args.uow, args.rounds)
            if "bulk" in sections and classic:
                bench_bulk(backend, args.bulk_rows, args.bulk_rounds)
            if "writers" in sections and backend.label != "sqlite-memory":
                bench_writers(backend, args.writers, args.writes)
        if "startup" in sections:
            bench_startup([b for b in backend_list if b.label != "sqlite-memory"], args.rounds)
    headline.conclude("bulk", bulk_cells, record_=args.record, check_=args.check)


if __name__ == "__main__":
    main()
