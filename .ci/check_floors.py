"""Fail unless .ci/constraints-floor.txt pins exactly the floors (>=) that pyproject.toml declares.

Run by .ci/run before the floor venv is built, so the two files cannot drift apart.
"""

import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_EXTRAS = ("postgres", "mysql", "async", "fastapi", "flask")


def declared_floors() -> dict[str, str]:
    """Lowest allowed version of each runtime requirement (core and runtime extras)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in RUNTIME_EXTRAS:
        lines += project["optional-dependencies"][extra]
    floors: dict[str, str] = {}
    for line in lines:
        requirement = Requirement(line)
        for spec in requirement.specifier:
            if spec.operator == ">=":
                floors[canonicalize_name(requirement.name)] = spec.version
    return floors


def pinned() -> dict[str, str]:
    """The ``name==version`` lines of the constraints file."""
    pins: dict[str, str] = {}
    for raw in (ROOT / ".ci" / "constraints-floor.txt").read_text().splitlines():
        line = raw.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


if __name__ == "__main__":
    floors, pins = declared_floors(), pinned()
    wrong = {
        name: (floor, pins.get(name))
        for name, floor in floors.items()
        if name not in pins or Version(pins[name]) != Version(floor)
    }
    if wrong:
        for name, (floor, pin) in sorted(wrong.items()):
            print(f"check_floors: {name}: pyproject says >={floor}, constraints pin {pin}")
        sys.exit(1)
    print(f"check_floors: {len(floors)} floors pinned: {', '.join(sorted(floors))}")
