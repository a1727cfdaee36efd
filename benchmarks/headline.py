"""The headline cells: the figures README.md and the docs state, as the benchmarks last
recorded them (``headline.json``), and the check that re-measured ones still match.

``python benchmarks/units.py --check`` (instructions per unit of work) and
``python benchmarks/bench.py --only bulkpath --check`` (bulk_insert against the raw
driver) re-run their cells and exit 1 when one moved more than 10% from the recorded
value; ``--record`` writes what the run measured. Run the checks before a release, not
in CI (a loaded machine moves wall-clock cells). ``tests/test_docs.py`` holds the
README's figures to this file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADLINE = Path(__file__).with_name("headline.json")
TOLERANCE = 0.10


def load() -> dict[str, dict[str, float]]:
    """Every recorded section: ``{section: {cell: value}}``."""
    recorded: dict[str, dict[str, float]] = json.loads(HEADLINE.read_text())
    return recorded


def record(section: str, cells: dict[str, float]) -> None:
    """Write ``cells`` (merged over what ``section`` had) into headline.json."""
    recorded = load() if HEADLINE.exists() else {}
    recorded[section] = {**recorded.get(section, {}), **cells}
    HEADLINE.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")


def check(section: str, cells: dict[str, float]) -> bool:
    """Print each cell of ``section`` this run measured that moved more than
    :data:`TOLERANCE` from its recorded value; True if none did."""
    recorded = load().get(section, {})
    moved = [
        f"{cell}: {value:g} recorded, {cells[cell]:g} now"
        for cell, value in recorded.items()
        if cell in cells and abs(cells[cell] - value) > TOLERANCE * value
    ]
    unmeasured = sorted(set(recorded) - set(cells))
    print("\n".join(moved) or f"{section}: every cell within {TOLERANCE:.0%} of headline.json")
    if unmeasured:
        print(f"{section}: not measured by this run: {', '.join(unmeasured)}")
    return not moved


def conclude(section: str, cells: dict[str, float], *, record_: bool, check_: bool) -> None:
    """What ``--record`` and ``--check`` ask for, at the end of a run: write ``cells``,
    and exit 1 if a checked cell moved."""
    if record_:
        record(section, cells)
    if check_ and not check(section, cells):
        sys.exit(1)
