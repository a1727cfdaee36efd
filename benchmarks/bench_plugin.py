"""What one test costs under the pytest plugin's ``db_session``, side by side with the
alternatives, on SQLite and PostgreSQL.

Run: ``python benchmarks/bench_plugin.py`` (``--help`` for sizes and backends).

For each backend a project of ``--tests`` generated tiny tests (insert one row through
the fixture's session, flush, count the rows) is run by pytest in a subprocess, once
per variant, the variants interleaved round by round in a shuffled order:

- ``db_session``: the plugin's fixture (one connection, outer transaction rolled
  back, the factory joined to it for the test).
- ``hand-written``: the SQLAlchemy docs' recipe, plugin disabled: ``connect()``,
  ``begin()``, ``Session(bind=connection, join_transaction_mode="create_savepoint")``,
  then close, rollback, close.
- ``drop/create``: ``create_all()`` before and ``drop_all()`` after every test.

The time per test is measured inside pytest, from the end of the first test to the
end of the last one (so start-up, collection and the schema preparation of the first
test are left out), divided by the number of tests; the median over the rounds is
reported. ``--breakdown`` also times the steps of ``db_session`` in-process.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
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
VARIANTS = ("db_session", "hand-written", "drop/create")

MODELS = '''
from sqlalchemy import String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "bench_plugin_row"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def tiny(session):
    """The body of every generated test."""
    session.add(Row(name="x"))
    session.flush()
    assert session.scalar(select(func.count()).select_from(Row)) == 1
'''

TIMER = '''
import json
import os
import time

_marks = []


def pytest_runtest_logfinish(nodeid, location):
    _marks.append(time.perf_counter())


def pytest_sessionfinish(session):
    if len(_marks) > 1:
        with open(os.environ["BENCH_OUT"], "w") as out:
            json.dump({"seconds": _marks[-1] - _marks[0], "tests": len(_marks) - 1}, out)
'''

FIXTURES = {
    "db_session": '''
import pytest


@pytest.fixture
def session(db_session):
    return db_session
''',
    "hand-written": '''
import os

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from models import Base


@pytest.fixture(scope="session")
def engine():
    engine = create_engine(os.environ["BENCH_URL"])
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine):
    connection = engine.connect()
    transaction = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint")
    yield session
    session.close()
    transaction.rollback()
    connection.close()
''',
    "drop/create": '''
import os

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from models import Base


@pytest.fixture(scope="session")
def engine():
    engine = create_engine(os.environ["BENCH_URL"])
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine):
    Base.metadata.create_all(engine)
    session = Session(engine)
    yield session
    session.close()
    Base.metadata.drop_all(engine)
''',
}


def make_project(folder: Path, variant: str, tests: int) -> None:
    """Write the generated project of one variant into ``folder``."""
    folder.mkdir(parents=True)
    (folder / "models.py").write_text(MODELS)
    (folder / "conftest.py").write_text(TIMER + FIXTURES[variant])
    body = "".join(
        f"\n\ndef test_{n}(session):\n    tiny(session)\n" for n in range(tests)
    )
    (folder / "test_generated.py").write_text("from models import tiny\n" + body)
    (folder / "pytest.ini").write_text("[pytest]\n")


def run_variant(folder: Path, variant: str, url: URL) -> float:
    """Run one variant's project; return the measured seconds per test."""
    out = folder / "result.json"
    env = {
        **os.environ,
        "BENCH_OUT": str(out),
        "BENCH_URL": url.render_as_string(hide_password=False),
        "PYTHONPATH": str(folder),
    }
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    if variant == "db_session":
        args += [
            f"--dbsession-url={url.render_as_string(hide_password=False)}",
            "--dbsession-schema=create_all",
            "--dbsession-metadata=models:Base.metadata",
        ]
    else:
        args += ["-p", "no:dbsession"]
    done = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    import json

    result = json.loads(out.read_text())
    return float(result["seconds"]) / int(result["tests"])


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

    for _ in range(iterations):
        hooks = plugin._Hooks()
        t = time.perf_counter()
        gen = plugin._rolled_back_session(factory, plugin._as_is, hooks, "db_session")
        session = next(gen)
        t = timed("db_session: set-up (connect, begin, join, session)", t)
        with session_scope():  # an app scope: a SAVEPOINT
            pass
        t = timed("db_session: one app session_scope() (SAVEPOINT)", t)
        for _ in gen:
            pass
        t = timed("db_session: teardown (close, rollback, close)", t)
        connection = engine.connect()
        transaction = connection.begin()
        plain = Session(bind=connection, join_transaction_mode="create_savepoint")
        t = timed("hand-written: set-up (connect, begin, session)", t)
        plain.close()
        transaction.rollback()
        connection.close()
        t = timed("hand-written: teardown (close, rollback, close)", t)
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
            folders = {v: Path(tmp) / v.replace("/", "_") for v in VARIANTS}
            for variant, folder in folders.items():
                make_project(folder, variant, options.tests)
            seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(options.rounds):
                order = list(VARIANTS)
                random.shuffle(order)
                for variant in order:
                    seconds[variant].append(run_variant(folders[variant], variant, url))
            base = statistics.median(seconds["hand-written"])
            print(
                f"\n### Cost per test on {backend}: {options.tests} generated tests, "
                f"{options.rounds} rounds; ratio vs hand-written\n"
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
