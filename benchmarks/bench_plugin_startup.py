"""What the installed pytest plugin costs a project that does not use dbsession at all.

Run: ``python benchmarks/bench_plugin_startup.py`` (``--help`` for the number of runs).

pytest runs, in a subprocess of this interpreter (so in the environment where dbsession
is installed and its ``pytest11`` entry point is active), a trivial project in a
temporary folder outside any repository: one file, ``def test_x(): assert True``, no
conftest. Each variant runs ``--runs`` times, interleaved, after one warm-up run each;
a run's cost is its CPU time (user + system, from ``getrusage(RUSAGE_CHILDREN)``),
which the machine's other work disturbs far less than wall time. The table gives the
median per variant: the plugin as installed, and ``-p no:dbsession`` (the floor: pytest
and the environment's other plugins without dbsession's).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "plugin installed": [],
    "-p no:dbsession (floor)": ["-p", "no:dbsession"],
}


def cpu_seconds(command: list[str], folder: Path) -> float:
    """The user + system CPU time of one run of ``command`` in ``folder``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, cwd=folder, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    """Measure each variant and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per variant (default 10)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dbsession-startup-") as name:
        folder = Path(name)
        (folder / "test_x.py").write_text("def test_x():\n    assert True\n")
        base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_x.py"]
        times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for extra in VARIANTS.values():
            cpu_seconds(base + extra, folder)  # warm-up: bytecode caches, file system cache
        for _ in range(args.runs):
            for variant, extra in VARIANTS.items():
                times[variant].append(cpu_seconds(base + extra, folder))
    print(f"CPU time (user + sys) of one pytest run of a trivial project, median of {args.runs}:")
    for variant, values in times.items():
        low, high = min(values), max(values)
        print(f"  {variant:<26} {statistics.median(values):.2f} s  ({low:.2f}-{high:.2f})")


if __name__ == "__main__":
    main()
