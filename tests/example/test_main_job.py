"""``python -m dbsession.example`` as an installed app runs it: from any folder, with its own
revisions and its own declarative base, never the folder's migrations or an app's metadata."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool

import dbsession
from dbsession.example.models import Base

TABLES = {"customer", "supplier", "orders"}


def main_job(cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the main job in ``cwd`` on its default database (./dbsession-example.sqlite3)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DBSESSION_MIGRATIONS")}
    return subprocess.run(
        [sys.executable, "-m", "dbsession.example"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_examples_models_are_not_in_dbsessions_metadata() -> None:
    assert set(Base.metadata.tables) == TABLES
    assert Base.metadata is not dbsession.Base.metadata
    assert not TABLES & set(dbsession.Base.metadata.tables)


def test_main_job_runs_twice_from_an_empty_folder(tmp_path: Path) -> None:
    for _ in range(2):
        result = main_job(tmp_path)
        assert result.returncode == 0, result.stderr
        assert "unit of work 1: committed" in result.stdout
        assert "nothing of it was kept" in result.stdout
    assert "rows now: customer 4, supplier 4, orders 4" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".sqlite3") == [
        "dbsession-example.sqlite3"
    ]
    assert "WARNING" not in result.stderr  # it chose its file: no forgotten global_init()


@pytest.mark.parametrize("layout", ["alembic.ini", "migrations"])
def test_main_job_never_runs_the_folders_own_migrations(tmp_path: Path, layout: str) -> None:
    """A project folder with its own migrations: the example runs only its own revisions."""
    marker = tmp_path / "foreign-env-ran"
    env_py = tmp_path / "migrations" / "env.py"
    env_py.parent.mkdir()
    env_py.write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n")
    if layout == "alembic.ini":
        (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s/migrations\n")
    result = main_job(tmp_path)
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    engine = create_engine(
        f"sqlite:///{tmp_path / 'dbsession-example.sqlite3'}", poolclass=NullPool
    )
    try:
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_main_job_leaves_an_apps_embedded_database_alone(tmp_path: Path) -> None:
    app_database = tmp_path / "dbsession.sqlite3"
    app_database.write_bytes(b"")  # the app's own (empty) SQLite file
    result = main_job(tmp_path)
    assert result.returncode == 0, result.stderr
    assert app_database.read_bytes() == b""
    assert "dbsession-example.sqlite3" in result.stdout
