"""What observing units of work costs: bare SQLAlchemy vs dbsession with observability off,
with slow-scope warnings (the default), with statistics, and with OpenTelemetry.

Run: ``python benchmarks/observability.py`` (CPU time, interleaved rounds, median), or
``python benchmarks/observability.py --instructions`` to count instructions with
``valgrind --tool=callgrind`` (load-independent; slow). Each unit of work is one
``SELECT`` by primary key on an in-memory SQLite database, the case where the
observation hooks weigh most.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from dbsession import DbSessionFactory, observability

MODES = ("bare sqlalchemy", "off", "warnings (default)", "stats", "opentelemetry")


def make_unit(mode: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """The unit of work for ``mode`` and a function that cleans up after it."""
    factory = DbSessionFactory("sqlite://")
    with factory.session_scope() as session:
        session.execute(text("CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT)"))
        session.execute(text("INSERT INTO item (id, name) VALUES (1, 'one')"))
    statement = text("SELECT name FROM item WHERE id = 1")
    if mode == "bare sqlalchemy":
        maker = sessionmaker(factory.engine, expire_on_commit=False)

        def bare() -> None:
            with maker.begin() as session:
                session.execute(statement).scalar()

        return bare, factory.dispose

    def unit() -> None:
        with factory.session_scope() as session:
            session.execute(statement).scalar()

    return unit, factory.dispose


def configure(mode: str) -> None:
    if mode == "off":
        observability.configure(slow_scope_seconds=None, stats=False)
    elif mode == "warnings (default)":
        observability.configure(stats=False)
    elif mode == "stats":
        observability.configure(stats=True)
    elif mode == "opentelemetry":
        observability.configure(opentelemetry=True, tracer_provider=_PROVIDER)


def _provider() -> object:
    try:
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return None
    return TracerProvider()  # spans made and ended, exported nowhere


_PROVIDER = _provider()


def cpu_times(units: int, rounds: int) -> dict[str, float]:
    """Median CPU microseconds per unit for each mode, rounds interleaved and shuffled."""
    made = {mode: make_unit(mode) for mode in MODES}
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(rounds):
        order = list(MODES)
        random.shuffle(order)
        for mode in order:
            unit = made[mode][0]
            configure(mode)
            started = time.process_time()
            for _ in range(units):
                unit()
            samples[mode].append((time.process_time() - started) / units * 1e6)
    for _, dispose in made.values():
        dispose()
    return {mode: statistics.median(values) for mode, values in samples.items()}


def instructions(mode: str, units: int) -> int:
    """Instructions of ``units`` units of work in ``mode`` minus a warm-up run's, by callgrind."""
    counts = []
    for count in (units // 10, units):
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                sys.executable,
                __file__,
                "--child",
                mode,
                str(count),
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dicts in every run
        )
        found = re.search(r"Collected : (\d+)", done.stderr)
        assert found, done.stderr[-2000:]
        counts.append(int(found.group(1)))
    return (counts[1] - counts[0]) // (units - units // 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--units", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--instructions", action="store_true", help="count with callgrind")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        unit, dispose = make_unit(args.child[0])
        configure(args.child[0])
        for _ in range(int(args.child[1])):
            unit()
        dispose()
        return
    if args.instructions:
        values = {mode: float(instructions(mode, min(args.units, 1000))) for mode in MODES}
        unit_name = "instructions per unit"
    else:
        values = cpu_times(args.units, args.rounds)
        unit_name = "CPU µs per unit"
    off = values["off"]
    print(f"{'mode':<22} {unit_name:>24} {'vs off':>8}")
    for mode in MODES:
        print(f"{mode:<22} {values[mode]:>24.1f} {values[mode] / off:>8.3f}")


if __name__ == "__main__":
    main()
