"""The complete Flask and FastAPI test files of docs/testing.md, run as written by pytester
in a subprocess against each backend."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import require_extra
from sqlalchemy import text
from sqlalchemy.engine import URL, Engine

pytest_plugins = ["pytester"]

DOC = Path(__file__).resolve().parents[1] / "docs" / "testing.md"
SECTIONS = {"flask": "## A complete Flask test file", "fastapi": "## A complete FastAPI test file"}
BLOCK = re.compile(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", re.S)


def doc_files(section: str) -> dict[str, str]:
    """The files written out in one section of docs/testing.md (``<!-- file: name -->``)."""
    doc = DOC.read_text(encoding="utf-8")
    start = doc.index(SECTIONS[section])
    end = doc.find("\n## ", start + 1)
    return dict(BLOCK.findall(doc[start : end if end != -1 else None]))


@pytest.fixture
def dropped_after(other_connection: Engine) -> Iterator[Engine]:
    """The backend; the docs' tables dropped afterwards (the schema outlives the inner run)."""
    yield other_connection
    with other_connection.begin() as conn:
        for table in ("note", "api_note"):
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))


@pytest.mark.parametrize(("section", "passed"), [("flask", 5), ("fastapi", 3)])
def test_the_docs_test_files_pass_as_written(
    pytester: pytest.Pytester,
    backend_url: URL,
    dropped_after: Engine,
    section: str,
    passed: int,
) -> None:
    require_extra(section, section)
    files = doc_files(section)
    assert any(name.startswith("test_") for name in files)
    for name, body in files.items():
        (pytester.path / name).write_text(body, encoding="utf-8")
    result = pytester.runpytest_subprocess(
        f"--dbsession-url={backend_url.render_as_string(hide_password=False)}", "-v"
    )
    result.assert_outcomes(passed=passed)
    with dropped_after.connect() as conn:
        table = "note" if section == "flask" else "api_note"
        assert conn.scalar(text(f"SELECT COUNT(*) FROM {table}")) == 0
