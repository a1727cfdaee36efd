"""The cost of one unit of work against bare SQLAlchemy: instructions and round trips.

Run: ``python benchmarks/units.py`` (``--help``). For each backend (SQLite in memory,
PostgreSQL, MariaDB), sync and async, it counts with ``valgrind --tool=callgrind`` the
instructions of this client process per unit of work (a ``get``, an ``insert``, a
read-modify-write; after a warm-up: independent of the machine's load) for bare
SQLAlchemy's defaults (``sessionmaker(create_engine(url)).begin()``), ``session_scope()``
and ``session_scope(readonly=True)``, all in one run; and, without valgrind, the round trips
per unit (PostgreSQL: the messages psycopg sends that wait for an answer, from libpq's
trace; MariaDB: the server's ``Questions`` counter of the pooled connection).

**Layouts.** A count moves by up to 1% with where objects land in memory (hash tables
keyed by address, the alignment of copies), and any change to the code moves them. So
each backend is counted in ``--layouts`` processes (default 3), each with its own fixed
``PYTHONHASHSEED`` and a different amount of memory taken before the run; address-space
randomisation is off and the heap frozen before each count, so a process of the same
code gives the same count. A ratio is the mean over the layouts; the table prints its
lowest and highest.

``--check`` re-runs the headline cells (``headline.py``: the ratios README.md and the
docs quote) and exits 1 when one moved more than 10%; ``--record`` writes this run's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import datetime
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import headline  # noqa: E402
from bench import MARIADB_URL, PG_URL, SEED, UNITS, Row, seed, unit_body  # noqa: E402

from dbsession import DbSessionFactory  # noqa: E402
from dbsession._config import async_twin  # noqa: E402

#: The variants, by their name in the tables.
VARIANTS = {
    "bare": "sqlalchemy (defaults)",
    "bare-tx": "sqlalchemy (defaults) + BEGIN IMMEDIATE ... COMMIT",
    "dbsession": "session_scope()",
    "dbsession-ro": "session_scope(readonly=True)",
}
BACKENDS = {"sqlite": "sqlite://", "postgresql": PG_URL, "mariadb": MARIADB_URL}
#: How many objects a counting process takes before its run (times the layout's number).
LAYOUT_ENV = "DBSESSION_BENCH_LAYOUT"
CALLGRIND_C = """
#include <valgrind/callgrind.h>
void cg_zero(void) { CALLGRIND_ZERO_STATS; }
void cg_dump(const char *label) { CALLGRIND_DUMP_STATS_AT(label); }
"""


def sync_scope(variant: str, url: str) -> Callable[[], Any]:
    """The scope of one variant, on a seeded database."""
    if variant.startswith("dbsession"):
        factory = DbSessionFactory(url)
        seed(factory.engine)
        if variant == "dbsession-ro":
            return lambda: factory.session_scope(readonly=True)
        return factory.session_scope
    engine = create_engine(url)
    if variant == "bare-tx":  # the honest transaction pysqlite leaves out, at driver cost

        @event.listens_for(engine, "connect")
        def manual(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def begin(connection: Any) -> None:
            connection.connection.driver_connection.execute("BEGIN IMMEDIATE")

    seed(engine)
    return sessionmaker(engine).begin


async def async_scope(variant: str, url: str) -> Callable[[], Any]:
    """The async scope of one variant (``session_scope()`` of an AsyncDbSessionFactory or
    ``async_sessionmaker.begin()``), on a seeded database."""
    if variant.startswith("dbsession"):
        from dbsession.asyncio import AsyncDbSessionFactory

        factory = AsyncDbSessionFactory(async_twin_url(url))
        await seed_async(factory.engine)
        if variant == "dbsession-ro":
            return lambda: factory.session_scope(readonly=True)
        return factory.session_scope
    engine = create_async_engine(async_twin_url(url))
    await seed_async(engine)
    return async_sessionmaker(engine).begin


async def seed_async(engine: Any) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(seed)


def async_twin_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    if url == "sqlite://":
        return "sqlite+aiosqlite://"
    return async_twin(make_url(url)).render_as_string(hide_password=False)


async def async_unit(kind: str, session: Any, i: int) -> None:
    """``unit_body`` for an AsyncSession."""
    if kind == "insert":
        session.add(Row(name=f"d{i}", value=i))
        return
    row = await session.get(Row, i % SEED + 1)
    assert row is not None
    if kind == "get":
        assert row.name
    else:
        row.value += 1


def settle() -> None:
    """Collect, then freeze what is left: each job's garbage collections then scan only
    its own new objects, not a heap the jobs before it grew (without this a job's count
    depends on its place in the run, by up to 2%)."""
    gc.collect()
    gc.freeze()


def worker(library: str, url: str, count: int, jobs: list[str]) -> None:
    """Under callgrind: for each ``mode:kind:variant`` job, warm up, zero the counters, run
    ``count`` units and dump the counts labelled with the job (one process)."""
    marks = ctypes.CDLL(library)
    layout = [object() for _ in range(int(os.environ.get(LAYOUT_ENV, "0")))]  # noqa: F841
    for job in jobs:
        mode, kind, variant = job.split(":")
        if mode == "sync":
            scope = sync_scope(variant, url)
            for i in range(30):
                with scope() as session:
                    unit_body(kind, session, i)
            settle()
            marks.cg_zero()
            for i in range(count):
                with scope() as session:
                    unit_body(kind, session, i)
            marks.cg_dump(job.encode())
            continue

        async def units(kind: str = kind, variant: str = variant, job: str = job) -> None:
            scope = await async_scope(variant, url)
            for i in range(30):
                async with scope() as session:
                    await async_unit(kind, session, i)
            settle()
            marks.cg_zero()
            for i in range(count):
                async with scope() as session:
                    await async_unit(kind, session, i)
            marks.cg_dump(job.encode())

        asyncio.run(units())


def count_instructions(url: str, count: int, jobs: list[str], layout: int) -> dict[str, float]:
    """Instructions per unit of each job, counted in one callgrind process (the
    ``layout``-th: its hash seed and the memory taken before the run)."""
    folder = tempfile.mkdtemp(prefix="dbsession-callgrind-")
    library = os.path.join(folder, "marks.so")
    source = os.path.join(folder, "marks.c")
    Path(source).write_text(CALLGRIND_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", library, source], check=True)
    out = os.path.join(folder, "run.out")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fixed = ["setarch", "-R"] if shutil.which("setarch") else []  # see "Layouts" above
    subprocess.run(
        [
            *fixed,
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            library,
            url,
            str(count),
            *jobs,
        ],
        capture_output=True,
        env={
            **os.environ,
            "PYTHONPATH": here,
            "PYTHONHASHSEED": str(layout),
            LAYOUT_ENV: str(layout * 777),
        },
        check=True,
    )
    counts: dict[str, float] = {}
    for dump in os.listdir(folder):
        if not dump.startswith("run.out."):
            continue
        text = Path(folder, dump).read_text()
        job = next((j for j in jobs if f"Client Request: {j}\n" in text), None)
        total = next((ln.split()[1] for ln in text.splitlines() if ln.startswith("summary:")), None)
        if job and total:
            counts[job] = int(total) / count
    return {job: counts[job] for job in jobs if job in counts}


def round_trips(url: str, kind: str, variant: str, count: int = 50) -> float | None:
    """Round trips per unit of a sync variant on a server (None on SQLite)."""
    if url.startswith("sqlite"):
        return None
    scope = sync_scope(variant, url)
    for i in range(5):
        with scope() as session:
            unit_body(kind, session, i)
    with scope() as session:  # one thread in turn: every unit gets this pooled connection
        driver = session.connection().connection.dbapi_connection
    if url.startswith("postgresql"):
        descriptor, path = tempfile.mkstemp()
        driver.pgconn.trace(descriptor)
        for i in range(count):
            with scope() as session:
                unit_body(kind, session, i)
        driver.pgconn.untrace()
        os.close(descriptor)
        sent = collections.Counter(
            fields[3].split(" ")[0]
            for fields in (line.rstrip("\n").split("\t") for line in open(path))
            if len(fields) > 3 and fields[1] == "F"
        )
        os.remove(path)
        return (sent["Query"] + sent["Sync"]) / count  # each waits for the server's answer

    def questions() -> int:
        cursor = driver.cursor()
        cursor.execute("SHOW SESSION STATUS LIKE 'Questions'")
        value = int(cursor.fetchone()[1])
        cursor.close()
        return value

    before = questions()
    for i in range(count):
        with scope() as session:
            unit_body(kind, session, i)
    return (questions() - before - 1) / count  # the SHOW itself counts once


def measure(
    backends: list[str],
    count: int,
    modes: list[str],
    kinds: tuple[str, ...] = UNITS,
    layouts: int = 3,
) -> dict[str, float]:
    """Print the tables and return every ratio (the mean over ``layouts``) by cell name
    ``backend:mode:kind:variant``."""
    cells: dict[str, float] = {}
    for backend in backends:
        url = BACKENDS[backend]
        jobs = [
            f"{mode}:{kind}:{variant}"
            for mode in modes
            for kind in kinds
            for variant in VARIANTS
            if (variant != "dbsession-ro" or kind == "get")
            and (variant != "bare-tx" or (backend == "sqlite" and mode == "sync"))
        ]
        runs = [count_instructions(url, count, jobs, layout) for layout in range(layouts)]
        print(
            f"\n### {backend}: instructions per unit (callgrind, {count} units after a "
            f"warm-up, mean of {layouts} layouts) and round trips per unit; ratio vs bare "
            "SQLAlchemy's unit (lowest-highest over the layouts)\n"
        )
        print("| mode | unit | variant | instructions | ratio | range | round trips |")
        print("|---|---|---|---:|---:|---:|---:|")
        for job in runs[0]:
            mode, kind, variant = job.split(":")
            value = statistics.mean(run[job] for run in runs)
            ratios = [run[job] / run[f"{mode}:{kind}:bare"] for run in runs]
            ratio = statistics.mean(ratios)
            trips = round_trips(url, kind, variant) if mode == "sync" else None
            shown = "-" if trips is None else f"{trips:g}"
            if variant != "bare":
                cells[f"{backend}:{job}"] = round(ratio, 3)
            print(
                f"| {mode} | {kind} | {VARIANTS[variant]} | {value:,.0f} | {ratio:.3f}x | "
                f"{min(ratios):.3f}-{max(ratios):.3f} | {shown} |"
            )
        sys.stdout.flush()
    return cells


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgresql,mariadb")
    parser.add_argument("--modes", default="sync,async")
    parser.add_argument("--units", type=int, default=200, help="units per variant")
    parser.add_argument("--layouts", type=int, default=3, help="processes per backend")
    parser.add_argument("--kinds", default=",".join(UNITS), help="of: " + ", ".join(UNITS))
    parser.add_argument("--check", action="store_true", help="compare with headline.json")
    parser.add_argument("--record", action="store_true", help="write headline.json")
    args = parser.parse_args()
    import sqlalchemy

    print(
        f"{datetime.date.today()}, load average {os.getloadavg()[0]:.1f}, Python "
        f"{sys.version.split()[0]}, SQLAlchemy {sqlalchemy.__version__}"
    )
    backends = args.backends.split(",")
    if args.check:
        wanted = {cell.split(":")[0] for cell in headline.load().get("units", {})}
        backends = [b for b in backends if b in wanted]
    kinds = tuple(args.kinds.split(","))
    cells = measure(backends, args.units, args.modes.split(","), kinds, args.layouts)
    headline.conclude("units", cells, record_=args.record, check_=args.check)


if __name__ == "__main__":
    main()
