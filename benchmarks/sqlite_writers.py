"""Writers on one SQLite file: dbsession's ``session_scope()`` against bare SQLAlchemy.

Run: ``python benchmarks/sqlite_writers.py`` (``--help`` for sizes).

1, 4, 16 and 64 threads each run read-modify-write units (read a counter, write it
back plus one) on one SQLite file (WAL), without and with a CPU hog (2x the cores of
busy processes), side by side in one run; the two variants alternate their order.

- ``session_scope()``: a ``DbSessionFactory`` (the in-process FIFO write gate, then
  ``BEGIN IMMEDIATE``; busy timeout 5 s).
- ``bare BEGIN IMMEDIATE``: ``create_engine`` + ``Session.begin()``, with
  ``BEGIN IMMEDIATE`` and a 5 s busy timeout: what Django's ``transaction_mode=
  "IMMEDIATE"`` and ``timeout=5`` give. Its writers wait in SQLite's busy handler.

Both have a pool with a connection per thread, and neither retries: every error is
counted. Reported: units per second, p50 and p99 latency of a unit (begin to commit),
errors, and lost updates (units committed minus what the counters add up to). Last,
the cost of the gate itself to a lone writer: an uncontended acquire and release.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sqlite_load import COUNTERS, bump, cpu_hog, create_counters, run_threads, total  # noqa: E402

from dbsession import DbSessionFactory  # noqa: E402
from dbsession._sqlite_gate import WriteGate  # noqa: E402

BUSY_TIMEOUT = 5.0


def bare_engine(url: str, pool_size: int) -> Engine:
    """SQLAlchemy configured like Django's SQLite with transaction_mode="IMMEDIATE"."""
    engine = create_engine(url, pool_size=pool_size)

    @event.listens_for(engine, "connect")
    def configure(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def measure(
    open_scope: Callable[[], AbstractContextManager[Session]], threads: int, units: int
) -> tuple[float, list[float], int, int]:
    """``threads`` threads x ``units`` bumps: (seconds, latencies, committed, errors)."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(number: int) -> None:
        mine: list[float] = []
        failed: list[BaseException] = []
        for i in range(units):
            start = time.perf_counter()
            try:
                with open_scope() as session:
                    bump(session, (number + i) % COUNTERS)
            except Exception as error:
                failed.append(error)
                continue
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)
            errors.extend(failed)

    start = time.perf_counter()
    run_threads(threads, work)
    return time.perf_counter() - start, latencies, len(latencies), len(errors)


def p(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, in milliseconds."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_size(folder: Path, threads: int, units: int, flip: bool) -> list[str]:
    """Both variants at one size, each on a fresh file; one table row each."""
    rows = []
    order = ["session_scope()", "bare BEGIN IMMEDIATE"]
    for name in reversed(order) if flip else order:
        url = f"sqlite:///{folder / f'{name[:4]}-{threads}-{time.monotonic_ns()}.sqlite3'}"
        factory = DbSessionFactory(url, pool_size=threads)
        create_counters(factory)
        if name == "session_scope()":
            open_scope: Callable[[], AbstractContextManager[Session]] = factory.session_scope
            engine = None
        else:
            engine = bare_engine(url, threads)
            open_scope = sessionmaker(engine, expire_on_commit=False).begin
        seconds, latencies, committed, errors = measure(open_scope, threads, units)
        lost = committed - total(factory)
        factory.dispose()
        if engine is not None:
            engine.dispose()
        rows.append(
            f"| {threads} | {name} | {committed / seconds:,.0f} | {p(latencies, 0.5):.1f} "
            f"| {p(latencies, 0.99):.1f} | {max(latencies, default=0) * 1000:.0f} "
            f"| {errors} | {lost} |"
        )
    return rows


def gate_cost(rounds: int = 200_000) -> float:
    """Nanoseconds of one uncontended acquire + release of a WriteGate."""
    gate = WriteGate("bench")
    start = time.perf_counter()
    for _ in range(rounds):
        gate.acquire(1.0)
        gate.release()
    return (time.perf_counter() - start) / rounds * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,16,64", help="writer thread counts")
    parser.add_argument("--units", type=int, default=1600, help="units per size (split)")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    hog = 2 * (os.cpu_count() or 1)
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} cores, load {os.getloadavg()}")
    header = (
        "| threads | variant | units/s | p50 ms | p99 ms | max ms | errors | lost updates |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|"
    )
    with tempfile.TemporaryDirectory() as folder:
        for label, loaded in (("idle", False), (f"CPU hog: {hog} busy processes", True)):
            print(f"\n{label}, {args.units} units per size\n\n{header}")
            for index, threads in enumerate(sizes):
                units = max(1, args.units // threads)
                if loaded:
                    with cpu_hog(hog):
                        rows = run_size(Path(folder), threads, units, flip=index % 2 == 1)
                else:
                    rows = run_size(Path(folder), threads, units, flip=index % 2 == 1)
                print("\n".join(rows), flush=True)
    costs = [gate_cost() for _ in range(5)]
    print(f"\nThe gate alone, uncontended acquire + release: {statistics.median(costs):.0f} ns")


if __name__ == "__main__":
    main()
