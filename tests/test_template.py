"""The template workflow of docs/template.md works exactly as written.

The steps are read from the page (its ```bash blocks, and the blocks marked
``<!-- file: path -->``, in order) and run in one shell, in a temporary copy of this
repository in the state a newcomer has after the README's first command (the example
has run, so its SQLite file and migration lock are there), through to the copied
project's own green test run. It creates a virtual environment and installs from the
package index, so it is slow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import blocks

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "docs" / "template.md"
EOF_MARK = "DBSESSION_TEMPLATE_FILE"


def steps_script(page: Path) -> str:
    """The page's steps as one shell script: bash blocks as they are, file blocks as
    here-documents writing their file."""
    lines = []
    for block in blocks(page.read_text()):
        if block.marker == "file":
            lines.append(f"cat > {block.argument} <<'{EOF_MARK}'\n{block.code}{EOF_MARK}\n")
        elif block.marker is None and block.language == "bash":
            lines.append(block.code)
    return "".join(lines)


def fresh_clone(target: Path) -> None:
    """The repository's files (tracked, and new ones not ignored), as a clone has them."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


@pytest.mark.slow
def test_steps_of_docs_template_md_give_a_green_test_run(tmp_path: Path) -> None:
    clone = tmp_path / "dbsession"
    fresh_clone(clone)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "PYTHONPATH", "VIRTUAL_ENV", "DBSESSION_METADATA")
        and not key.startswith(("DBSESSION_TEST", "PYTEST"))
    }
    # The README's first command, run in the clone: it leaves its SQLite file behind.
    subprocess.run(
        [sys.executable, "-m", "dbsession.example"],
        cwd=clone,
        env={**env, "PYTHONPATH": str(clone)},
        check=True,
        capture_output=True,
    )
    assert (clone / "dbsession-example.sqlite3").exists()

    script = steps_script(TEMPLATE)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    output = f"{script}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, output
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, output

    service = tmp_path / "myservice"
    revisions = list((service / "migrations" / "versions").glob("*.py"))
    assert len(revisions) == 1, revisions  # the service's first revision, none of the example's
    assert "product" in revisions[0].read_text()
    assert not (service / "tests" / "test_example_store.py").exists()
    assert 'name = "myservice"' in (service / "pyproject.toml").read_text()


def test_the_script_has_every_step_in_order() -> None:
    script = steps_script(TEMPLATE)
    order = [
        "cp -r dbsession myservice",
        "python3 -m venv .venv",
        "cat > myservice/models.py",
        "alembic revision --autogenerate",
        "cat > tests/test_products.py",
        ".venv/bin/python -m pytest",
    ]
    positions = [script.index(step) for step in order]
    assert positions == sorted(positions)
