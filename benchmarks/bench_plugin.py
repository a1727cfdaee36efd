"""What one test costs under the pytest plugin's ``db_session``, side by side with the
alternatives, on SQLite and PostgreSQL.

Run: ``python benchmarks/bench_plugin.py`` (``--help`` for sizes and backends).

For each backend, pytest runs (in a subprocess, once per round) a generated project of
``--tests`` tiny tests per variant, the variants' tests interleaved in a shuffled order
so that machine noise hits them alike. Each tiny test inserts one row through its
fixture's session, flushes and counts the rows. The variants:

- ``db_session``: the plugin's fixture (one connection, outer transaction rolled
  back, the factory joined to it for the test).
- ``hand-written``: the SQLAlchemy docs' recipe: ``connect()``, ``begin()``,
  ``Session(bind=connection, join_transaction_mode="create_savepoint")``, then
  close, rollback, close (its engine made once, like the plugin's).
- ``hand-written, dbsession's engine``: the same recipe on the engine dbsession
  builds (pool pre-ping, SQLite's explicit BEGIN, its event listeners), which the
  plugin uses too: the difference between the two hand-written rows is the engine's,
  the rest is the plugin's.
- ``drop/create``: ``create_all()`` before and ``drop_all()`` after every test (a
  table of its own, so it does not disturb the others).

A test's cost is what pytest reports for its set-up, call and teardown (fixture work
and the test body; pytest's own bookkeeping between tests is the same for all and left
out). The first test of each variant (the schema, the engine) is left out; the table
gives the median over all rounds. ``--breakdown`` also times the steps of
``db_session`` in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

PG_URL = os.environ.get(
    "DBSESSION_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1/test"
)
VARIANTS = ("db_session", "hand-written", "hand-written, dbsession's engine", "drop/create")

TABLE = """

class {base}(DeclarativeBase):
    pass


class {name}({base}):
    __tablename__ = "{table}"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))

"""
MODELS = (
    "from sqlalchemy import String, func, select\n"
    "from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column\n"
    + TABLE.format(base="Base", name="Row", table="bench_plugin_row")
    + TABLE.format(base="Scratch", name="ScratchRow", table="bench_plugin_scratch")
    + '''
def tiny(session, model):
    """The body of every generated test."""
    session.add(model(name="x"))
    session.flush()
    assert session.scalar(select(func.count()).select_from(model)) == 1
'''
)

CONFTEST = """
import json
import os

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from dbsession import DbSessionFactory
from models import Scratch

_costs = {}


def pytest_runtest_logreport(report):
    variant = report.nodeid.rsplit("_", 1)[-1]
    _costs.setdefault(report.nodeid, [variant, 0.0])[1] += report.duration


def pytest_sessionfinish(session):
    with open(os.environ["BENCH_OUT"], "w") as out:
        json.dump(list(_costs.values()), out)


@pytest.fixture(scope="session")
def engine():
    engine = create_engine(os.environ["BENCH_URL"])
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def dbsession_engine():
    factory = DbSessionFactory(os.environ["BENCH_URL"])
    yield factory.engine
    factory.dispose()


def recipe(engine):
    connection = engine.connect()
    transaction = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint")
    yield session
    session.close()
    transaction.rollback()
    connection.close()


@pytest.fixture
def hand_written(engine, dbsession_database):  # the plugin made the schema
    yield from recipe(engine)


@pytest.fixture
def hand_written_db(dbsession_engine, dbsession_database):
    yield from recipe(dbsession_engine)


@pytest.fixture
def drop_create(engine):
    Scratch.metadata.create_all(engine)
    session = Session(engine)
    yield session
    session.close()
    Scratch.metadata.drop_all(engine)
"""

TESTS = {
    "db_session": "def test_{n}_db(db_session):\n    tiny(db_session, Row)\n",
    "hand-written": "def test_{n}_hand(hand_written):\n    tiny(hand_written, Row)\n",
    "hand-written, dbsession's engine": (
        "def test_{n}_handdb(hand_written_db):\n    tiny(hand_written_db, Row)\n"
    ),
    "drop/create": "def test_{n}_drop(drop_create):\n    tiny(drop_create, ScratchRow)\n",
}
SUFFIX = {
    "db": "db_session",
    "hand": "hand-written",
    "handdb": "hand-written, dbsession's engine",
    "drop": "drop/create",
}


def make_project(folder: Path, tests: int) -> None:
    """Write the generated project into ``folder``: ``tests`` tests per variant, shuffled."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "models.py").write_text(MODELS)
    (folder / "conftest.py").write_text(CONFTEST)
    bodies = [template.format(n=n) for n in range(tests) for template in TESTS.values()]
    random.shuffle(bodies)
    header = "from models import Row, ScratchRow, tiny\n"
    (folder / "test_generated.py").write_text(header + "\n\n".join(["", *bodies]))
    (folder / "pytest.ini").write_text("[pytest]\n")


def run_round(folder: Path, url: URL) -> dict[str, list[float]]:
    """Run the project once; return each variant's per-test costs (seconds), first left out."""
    out = folder / "result.json"
    rendered = url.render_as_string(hide_password=False)
    env = {**os.environ, "BENCH_OUT": str(out), "BENCH_URL": rendered, "PYTHONPATH": str(folder)}
    args = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
        f"--dbsession-url={rendered}", "--dbsession-schema=create_all",
        "--dbsession-metadata=models:Base.metadata",
    ]  # fmt: skip
    done = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"the generated tests failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    costs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for suffix, seconds in json.loads(out.read_text()):
        costs[SUFFIX[suffix]].append(seconds)
    return {variant: values[1:] for variant, values in costs.items()}


@contextmanager
def backend_database(backend: str, workdir: Path) -> Iterator[URL]:
    """A fresh database for one backend, dropped (or deleted) afterwards."""
    if backend == "sqlite":
        yield URL.create("sqlite", database=str(workdir / "bench.db"))
        return
    base = make_url(PG_URL)
    name = f"dbsession_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield base.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def breakdown(url: URL, iterations: int) -> list[tuple[str, float]]:
    """Time each step of db_session and of the hand-written fixture in-process (µs)."""
    from sqlalchemy.orm import Session

    import dbsession.testing as plugin
    from dbsession import DbSessionFactory, session_scope

    factory = DbSessionFactory(url)
    engine = factory.engine
    steps: dict[str, list[float]] = {}

    def timed(name: str, start: float) -> float:
        now = time.perf_counter()
        steps.setdefault(name, []).append(now - start)
        return now

    connections = plugin._Connections()
    for _ in range(iterations):
        hooks = plugin._Hooks()
        t = time.perf_counter()
        gen = plugin._rolled_back_session(factory, plugin._as_is, hooks, "db_session", connections)
        next(gen)
        t = timed("db_session: set-up (begin, join, session)", t)
        with session_scope():  # an app scope: a SAVEPOINT
            pass
        t = timed("db_session: one app session_scope() (SAVEPOINT)", t)
        for _ in gen:
            pass
        t = timed("db_session: teardown (close, rollback)", t)
        connection = engine.connect()
        transaction = connection.begin()
        plain = Session(bind=connection, join_transaction_mode="create_savepoint")
        t = timed("hand-written: set-up (connect, begin, session)", t)
        plain.close()
        transaction.rollback()
        connection.close()
        t = timed("hand-written: teardown (close, rollback, close)", t)
    connections.release(factory, plugin._as_is)
    factory.dispose()
    return [(name, statistics.median(values) * 1e6) for name, values in steps.items()]


def main() -> None:
    """Parse the arguments, run the rounds, print the Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--breakdown", type=int, default=500, help="iterations (0: skip)")
    options = parser.parse_args()
    for backend in options.backends.split(","):
        with tempfile.TemporaryDirectory() as tmp, backend_database(backend, Path(tmp)) as url:
            seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(options.rounds):
                make_project(Path(tmp) / "project", options.tests)
                for variant, values in run_round(Path(tmp) / "project", url).items():
                    seconds[variant].extend(values)
            base = statistics.median(seconds["hand-written"])
            print(
                f"\n### Cost per test on {backend}: {options.tests} generated tests per variant, "
                f"interleaved, {options.rounds} rounds; ratio vs hand-written\n"
            )
            print("| backend | variant | median per test | ratio | note |")
            print("|---|---|---:|---:|---|")
            for variant in VARIANTS:
                median = statistics.median(seconds[variant])
                note = "target <= 1.1x" if variant == "db_session" else ""
                print(
                    f"| {backend} | {variant} | {median * 1e6:,.0f} µs | "
                    f"{median / base:.3f}x | {note} |"
                )
            if options.breakdown:
                print(f"\n#### Where the time goes on {backend} (in-process, median µs)\n")
                print("| step | µs |")
                print("|---|---:|")
                for name, micros in breakdown(url, options.breakdown):
                    print(f"| {name} | {micros:,.0f} |")


if __name__ == "__main__":
    main()
