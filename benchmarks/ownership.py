"""What finding the running code's scope costs, at call-stack depth 0 and 200.

``current_session()`` asks whether the innermost open scope belongs to the running
code. Before issue 23 that check walked the Python call stack up to the frame that
entered the scope (``sys._getframe`` and ``f_back``), so it cost more the deeper the
caller; now the owner is recorded when the scope is entered and the check is O(1).

Run: ``python benchmarks/ownership.py``. Prints, per depth, the microseconds of one
``current_session()`` call and, side by side, of the former stack walk alone (reproduced
here, ``walk_to``), on an in-memory SQLite scope (no database I/O is involved: the
session is only looked up). Median of interleaved rounds, CPU time.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from types import FrameType

from dbsession import DbSessionFactory, current_session, observability

DEPTHS = (0, 200)
CALLS = 20_000
ROUNDS = 7


def walk_to(target: FrameType | None) -> bool:
    """The ownership check before issue 23: is ``target`` on the running call stack?"""
    python_frame: FrameType | None = sys._getframe(1)
    while python_frame is not None:
        if python_frame is target:
            return True
        python_frame = python_frame.f_back
    return False


def at_depth(depth: int, run: Callable[[], float]) -> float:
    """Call ``run`` from ``depth`` extra Python frames down."""
    if depth == 0:
        return run()
    return at_depth(depth - 1, run)


def per_call(check: Callable[[], object]) -> float:
    """Microseconds per ``check()``, CPU time over ``CALLS`` calls."""
    start = time.process_time()
    for _ in range(CALLS):
        check()
    return (time.process_time() - start) / CALLS * 1e6


def main() -> None:
    observability.configure(slow_scope_seconds=None, stats=False)
    factory = DbSessionFactory("sqlite://")
    results: dict[tuple[str, int], list[float]] = {}
    with factory.session_scope():
        entered = sys._getframe()
        for _ in range(ROUNDS):
            for depth in DEPTHS:
                for name, check in (
                    ("current_session()", current_session),
                    ("stack walk (before)", lambda: walk_to(entered)),
                ):
                    timing = at_depth(depth, lambda check=check: per_call(check))  # type: ignore[misc]
                    results.setdefault((name, depth), []).append(timing)
    factory.dispose()
    print(f"{'depth':>6} {'current_session() us':>22} {'stack walk alone (before) us':>30}")
    for depth in DEPTHS:
        now = statistics.median(results[("current_session()", depth)])
        walk = statistics.median(results[("stack walk (before)", depth)])
        print(f"{depth:>6} {now:>22.2f} {walk:>30.2f}")


if __name__ == "__main__":
    main()
