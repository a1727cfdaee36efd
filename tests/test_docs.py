"""The docs cannot rot: every ```python block of README.md and docs/*.md is executed.

Each page runs in a fresh interpreter (so a page's models never meet another page's),
in an empty temporary folder, against a temporary SQLite file (``DATABASE_URL``), with
warnings as errors (a deprecated name in the docs fails). Its blocks run in order in
one namespace, as if pasted one after the other into ``python``; a block with a
top-level ``await`` runs on the page's event loop, as in ``python -m asyncio``.

A block may be preceded by a marker comment on the line right before its fence:

- ``<!-- file: path -->``: the block (of any language) is the content of that file; it
  is written into the folder instead of being run. When a page writes ``test_*.py``
  files, pytest runs them in the folder at the end and must pass.
- ``<!-- not-run: reason -->``: illustrative only (a fragment of a bigger file); the
  reason is required, and such blocks are counted so they stay few.

``python tests/test_docs.py PAGE`` runs one page by hand.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from helpers import blocks

ROOT = Path(__file__).resolve().parents[1]
# docs/template.md is a shell session in a copy of the repository: tests/test_template.py.
PAGES = sorted(
    [
        ROOT / "README.md",
        # template.md: tests/test_template.py; testing.md: tests/test_testing_docs.py runs its
        # apps and test files as the plugin's users would, on every backend.
        *(p for p in (ROOT / "docs").glob("*.md") if p.name not in ("template.md", "testing.md")),
    ]
)
# Extra environment for a page: the migrations page runs from "the project folder".
PAGE_ENV = {"migrations.md": {"DBSESSION_MIGRATIONS": str(ROOT / "alembic.ini")}}
TABLE_START = "<!-- errors table: generated from dbsession.errors by tests/test_docs.py -->"
TABLE_END = "<!-- end of the generated errors table -->"
#: As in pyproject's filterwarnings: Starlette < 0.50 (FastAPI's floor) meets this alias.
ANYIO_ALIAS = "ignore:The anyio.abc.BlockingPortal alias is deprecated:DeprecationWarning"
MAX_NOT_RUN = 12  # across all pages: illustrative fragments stay the exception


def run_page(page: Path) -> None:
    """Run the page's blocks here (in the current folder and interpreter); raise on failure."""
    main = types.ModuleType("__main__")  # what the blocks see, as if typed into python
    sys.modules["__main__"] = main
    loop = asyncio.new_event_loop()
    tests: list[str] = []
    sys.path.insert(0, os.getcwd())
    try:
        run_blocks(page, main.__dict__, loop, tests)
    finally:
        from dbsession import DbSessionFactory

        DbSessionFactory.global_dispose()
        if "dbsession.asyncio" in sys.modules:
            from dbsession.asyncio import AsyncDbSessionFactory

            loop.run_until_complete(AsyncDbSessionFactory.global_dispose())
        loop.close()
    if tests:
        print(f"--- pytest {' '.join(tests)}", flush=True)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
        subprocess.run(command, check=True)


def run_blocks(
    page: Path, namespace: dict[str, Any], loop: asyncio.AbstractEventLoop, tests: list[str]
) -> None:
    """Write the page's file blocks and run its python blocks, in order."""
    for block in blocks(page.read_text()):
        where = f"{page.name}:{block.line}"
        if block.marker == "file":
            path = Path(block.argument)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.code)
            if path.name.startswith("test_") and path.suffix == ".py":
                tests.append(str(path))
        elif block.marker is None and block.language == "python":
            print(f"--- running {where}", flush=True)
            flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT  # and none of this file's __future__ flags
            code = compile(block.code, where, "exec", flags=flags, dont_inherit=True)
            if code.co_flags & inspect.CO_COROUTINE:
                loop.run_until_complete(eval(code, namespace))
            else:
                exec(code, namespace)


def errors_table() -> str:
    """The table of docs/errors.md, made from ``dbsession.errors``: each exception, what it
    is a kind of (dbsession's parent; SQLAlchemy's class where it replaces one), whether
    ``dbsession`` re-exports it, its docstring's first paragraph, and its ``When: ... Fix:
    ...`` paragraph (the one table of errors: docs link to it rather than repeat rows)."""
    from sqlalchemy import exc as sa_exc

    import dbsession
    from dbsession import errors

    rows = [
        "| error | is a | also in `dbsession` | what it means | when, and the fix |",
        "|---|---|---|---|---|",
    ]
    for name in errors.__all__:
        error = getattr(errors, name)
        ours = [b for b in error.__mro__[1:] if b.__module__.startswith("dbsession")]
        parents = [f"`{b.__name__}`" for b in ours if not b.__name__.startswith("_")][:1]
        parents += [
            f"`sqlalchemy.exc.{b.__name__}`"
            for b in (sa_exc.OperationalError, sa_exc.DBAPIError)
            if issubclass(error, b)
        ][:1]
        paragraphs = [
            " ".join(p.split()).replace("``", "`")
            for p in (inspect.getdoc(error) or "").split("\n\n")
        ]
        when = next((p for p in paragraphs if p.startswith("When: ")), "")
        exported = "yes" if name in dbsession.__all__ else ""
        rows.append(
            f"| `{name}` | {', '.join(parents) or '`Exception`'} | {exported} | {paragraphs[0]} "
            f"| {when.removeprefix('When: ')} |"
        )
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_every_python_block_of_the_page_runs(page: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'docs.sqlite3'}",
        "PYTHONPATH": str(ROOT),
        **PAGE_ENV.get(page.name, {}),
    }
    env.pop("DBSESSION_TEST_URL", None)
    result = subprocess.run(
        [sys.executable, "-W", "error", "-W", ANYIO_ALIAS, __file__, str(page)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{page.name}:\n{result.stdout}\n{result.stderr}"


def test_blocks_not_run_say_why_and_stay_few() -> None:
    not_run = [
        (page.name, block)
        for page in PAGES
        for block in blocks(page.read_text())
        if block.marker == "not-run"
    ]
    assert all(block.argument for _, block in not_run), "a not-run marker needs a reason"
    assert len(not_run) <= MAX_NOT_RUN, [f"{name}:{block.line}" for name, block in not_run]


def test_the_error_table_is_generated_from_dbsession_errors() -> None:
    page = (ROOT / "docs" / "errors.md").read_text()
    start, end = page.index(TABLE_START) + len(TABLE_START) + 1, page.index(TABLE_END)
    assert page[start:end] == errors_table(), (
        "docs/errors.md is out of date: python tests/test_docs.py --errors-table"
    )


def test_the_extractor_sees_markers_and_plain_blocks() -> None:
    page = (
        "text\n```python\nx = 1\n```\n<!-- not-run: a fragment -->\n```python\ny(\n```\n"
        "<!-- file: pkg/mod.py -->\n```python\nz = 3\n```\n```bash\nls\n```\n"
    )
    found = blocks(page)
    assert [(b.language, b.marker, b.argument, b.code) for b in found] == [
        ("python", None, "", "x = 1\n"),
        ("python", "not-run", "a fragment", "y(\n"),
        ("python", "file", "pkg/mod.py", "z = 3\n"),
        ("bash", None, "", "ls\n"),
    ]
    assert found[0].line == 3


def test_the_layout_page_names_every_module_and_nothing_gone() -> None:
    """docs/layout.md is the map a reader opens first: every module of the package (and
    the plugin's entry module) has its line, and no line names a module that is gone."""
    root = Path(__file__).resolve().parent.parent
    layout = (root / "docs" / "layout.md").read_text()
    package = root / "dbsession"
    modules = {
        path.name
        for path in package.glob("*.py")
        if path.name not in ("__main__.py", "_version.py")
    } | {"pytest_dbsession.py"}
    package_part = layout[: layout.index("\ntests/")]  # the test tree's files come after
    named = set(re.findall(r"^\s*(\w+\.py)\s", package_part, flags=re.MULTILINE))
    assert sorted(modules - named) == []
    assert sorted(named - modules) == []


def readme_figures(cells: dict[str, dict[str, float]]) -> list[str]:
    """The figures README.md states, as benchmarks/headline.json recorded them."""

    def span(prefixes: tuple[str, ...], suffix: str) -> str:
        units = cells["units"].items()
        values = [v for k, v in units if k.startswith(prefixes) and k.endswith(suffix)]
        return f"{min(values):.3f}-{max(values):.3f}x"

    bulk = max(cells["bulk"].values())
    return [
        f"costs {span(('postgresql:sync:',), ':dbsession')} the instructions on PostgreSQL",
        f"{span(('mariadb:sync:',), ':dbsession')} on MariaDB",
        f"a read-only one {span(('postgresql:', 'mariadb:'), ':dbsession-ro')}",
        f"within {bulk:.2f}x of the raw driver",
    ]


def test_the_readmes_figures_are_the_recorded_headline_cells() -> None:
    """Each figure README.md states is what a benchmark printed and recorded
    (benchmarks/headline.json, re-measured by ``--check``; see benchmarks/headline.py)."""
    cells = json.loads((ROOT / "benchmarks" / "headline.json").read_text())
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert [figure for figure in readme_figures(cells) if figure not in readme] == []


def test_the_version_is_the_changelogs_newest_section() -> None:
    """pyproject's version and CHANGELOG.md's first section name one release, and there is
    one section for what is not released yet."""
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    sections = re.findall(r"^## \[([^\]]+)\](.*)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert version is not None and sections
    release = re.match(r"\d+\.\d+\.\d+", version.group(1))
    assert release is not None and sections[0][0] == release.group(0), (version, sections[0])
    assert [s for s in sections if "unreleased" in s[1].lower()] == sections[:1]


if __name__ == "__main__":
    if sys.argv[1] == "--errors-table":
        print(errors_table(), end="")
    else:
        run_page(Path(sys.argv[1]))
