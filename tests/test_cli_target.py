"""The commands act on the database they name (issues 24 and 27): the target is resolved
once, before the models are imported, and every command names the one it uses; env.py may
hand run_env() the app's own URL; several heads are one line naming them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool

from dbsession import DbSessionFactory, migrations
from dbsession.errors import MigrationError

BIN = Path(sys.executable).parent

REVISION = """
from alembic import op
import sqlalchemy as sa

revision = "{rev}"
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
    {up}


def downgrade() -> None:
    {down_op}
"""

#: A models module as many apps write it: load_dotenv() on import changes DATABASE_URL.
DOTENV_MODELS = """
import os

from dbsession import Base

os.environ["DATABASE_URL"] = "sqlite:///from-dotenv.sqlite3"
"""


def revision(folder: Path, rev: str, down: str | tuple[str, ...] | None, table: str = "") -> None:
    up = f'op.create_table("{table}", sa.Column("id", sa.Integer, primary_key=True))'
    (folder / "versions" / f"{rev}.py").write_text(
        REVISION.format(
            rev=rev,
            down=down,
            up=up if table else "pass",
            down_op=f'op.drop_table("{table}")' if table else "pass",
        )
    )


def project(tmp_path: Path, env_py: str = "run_env()") -> Path:
    folder = tmp_path / "migrations"
    (folder / "versions").mkdir(parents=True)
    (folder / "env.py").write_text(f"from dbsession.migrations import run_env\n\n{env_py}\n")
    (tmp_path / "alembic.ini").write_text(
        "[alembic]\nscript_location = %(here)s/migrations\n"
        "dbsession_metadata = models:Base.metadata\n"
    )
    (tmp_path / "models.py").write_text("from dbsession import Base\n")
    revision(folder, "0001", None, "product")
    return tmp_path


def dbsession(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "PYTHONPATH") and not k.startswith("DBSESSION_")
    }
    return subprocess.run(
        [str(BIN / "dbsession"), *args],
        cwd=cwd,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def tables(path: Path) -> set[str]:
    engine = create_engine(f"sqlite:///{path}", poolclass=NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_a_models_module_that_loads_dotenv_cannot_move_the_target(tmp_path: Path) -> None:
    root = project(tmp_path)
    (root / "models.py").write_text(DOTENV_MODELS)
    app = root / "app.sqlite3"
    url = f"sqlite:///{app}"

    upgraded = dbsession("upgrade", cwd=root, DATABASE_URL=url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "product" in tables(app)
    current = dbsession("current", cwd=root, DATABASE_URL=url)
    assert current.stdout.strip() == "0001"
    assert f"reading {url} (from DATABASE_URL)" in current.stderr
    downgraded = dbsession("downgrade", "base", cwd=root, DATABASE_URL=url)
    assert downgraded.returncode == 0, downgraded.stderr
    assert f"downgrading {url} (from DATABASE_URL) to base" in downgraded.stderr
    assert "product" not in tables(app)
    assert not (root / "from-dotenv.sqlite3").exists()


def test_run_env_takes_the_apps_url_and_every_command_names_it(tmp_path: Path) -> None:
    root = project(tmp_path, 'run_env(url=lambda: "sqlite:///from-settings.sqlite3")')
    used = "sqlite:///from-settings.sqlite3 (from run_env(url=...) in env.py)"

    current = dbsession("current", cwd=root)
    assert current.returncode == 0, current.stderr
    assert current.stdout.startswith("<base> (no database: ")
    assert f"reading {used}" in current.stderr
    upgraded = dbsession("upgrade", cwd=root)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"upgrading {used} to head" in upgraded.stderr
    assert "product" in tables(root / "from-settings.sqlite3")
    current = dbsession("current", cwd=root)
    assert (current.stdout.strip(), current.stderr.strip()) == (
        "0001",
        f"dbsession: reading {used}",
    )
    checked = dbsession("check", "--revision-only", cwd=root)
    assert checked.returncode == 0, checked.stderr
    downgraded = dbsession("downgrade", "base", cwd=root)
    assert f"downgrading {used} to base" in downgraded.stderr
    assert "product" not in tables(root / "from-settings.sqlite3")
    assert not (root / "dbsession.sqlite3").exists()
    # A URL given to the command still wins over env.py's.
    other = root / "other.sqlite3"
    assert dbsession("upgrade", "--url", f"sqlite:///{other}", cwd=root).returncode == 0
    assert "product" in tables(other)


def test_upgrade_with_two_heads_in_the_folder_is_one_line_naming_them(tmp_path: Path) -> None:
    root = project(tmp_path)
    revision(root / "migrations", "0002", "0001", "a")
    revision(root / "migrations", "0003", "0001", "b")
    result = dbsession("upgrade", cwd=root)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "dbsession upgrade: the migrations folder has 2 heads (0002, 0003): merge them with "
        "'dbsession merge -m merge', then upgrade; or upgrade to all of them with "
        "'dbsession upgrade heads'."
    )


def test_a_database_with_two_applied_heads_is_one_line_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = project(tmp_path)
    revision(root / "migrations", "0002", "0001", "a")
    revision(root / "migrations", "0003", "0001", "b")
    revision(root / "migrations", "0004", ("0002", "0003"))
    url = f"sqlite:///{root / 'app.sqlite3'}"
    assert dbsession("upgrade", "--url", url, cwd=root).returncode == 0
    down = dbsession("downgrade", "0002", "--url", url, cwd=root)  # one parent of the merge
    assert down.returncode == 0, down.stderr

    current = dbsession("current", "--url", url, cwd=root)
    assert current.returncode == 0, current.stderr
    assert current.stdout == "0002, 0003 (2 heads applied: 'dbsession upgrade')\n"
    checked = dbsession("check", "--revision-only", "--url", url, cwd=root)
    assert checked.returncode == 1
    expected = (
        f"The database {url} (from argument) has 2 applied heads (0002, 0003), as after a "
        "downgrade to one parent of a merge: run 'dbsession upgrade' to reach the head "
        "again, or downgrade further."
    )
    assert checked.stderr == f"dbsession check: {expected}\n"
    with pytest.raises(MigrationError) as caught:
        migrations.current(url=url)
    assert str(caught.value) == expected
    monkeypatch.chdir(root)
    with pytest.raises(MigrationError, match=r"has 2 applied heads \(0002, 0003\)"):
        DbSessionFactory.global_init(url, require_migrated=True)
    assert dbsession("upgrade", "--url", url, cwd=root).returncode == 0
    assert dbsession("current", "--url", url, cwd=root).stdout == "0004\n"


def test_a_migration_error_names_where_the_url_came_from(tmp_path: Path) -> None:
    root = project(tmp_path)
    unreachable = "postgresql://nobody:secret-pw@127.0.0.1:9/app"
    for args in (["upgrade"], ["current"]):
        result = dbsession(*args, cwd=root, DATABASE_URL=unreachable)
        assert result.returncode == 1
        assert "(from DATABASE_URL) is right." in result.stderr, result.stderr
        assert "(from argument)" not in result.stderr
        assert "secret-pw" not in result.stderr
