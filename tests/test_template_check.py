"""The template's own alembic.ini and migrations/ agree: in a fresh copy, ``alembic upgrade
head`` then ``alembic check`` is clean; drift is reported as table and column names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

MODELS = """\
from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from dbsession import Base


class Product(Base):
    __tablename__ = "product"

    id: Mapped[int] = mapped_column(primary_key=True)
"""

DRIFT = """
    title: Mapped[str] = mapped_column(String(200))


class Tag(Base):
    __tablename__ = "tag"

    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(50))
"""


def run(*command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A console script of this venv, with the environment a newcomer has (no DATABASE_URL)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "PYTHONPATH")
        and not key.startswith(("DBSESSION_METADATA", "DBSESSION_MIGRATIONS"))
    }
    return subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The template's Alembic files, as a fresh clone has them."""
    shutil.copy(ROOT / "alembic.ini", tmp_path / "alembic.ini")
    shutil.copytree(
        ROOT / "migrations", tmp_path / "migrations", ignore=shutil.ignore_patterns("__pycache__")
    )
    return tmp_path


def test_alembic_upgrade_head_then_check_is_clean_in_a_fresh_copy(copy: Path) -> None:
    upgraded = run("alembic", "upgrade", "head", cwd=copy)
    assert upgraded.returncode == 0, upgraded.stderr
    checked = run("alembic", "check", cwd=copy)
    assert checked.returncode == 0, checked.stderr
    assert "No new upgrade operations detected" in checked.stdout
    assert (copy / "dbsession.sqlite3").exists()


def test_check_names_the_tables_and_columns_that_drifted(copy: Path) -> None:
    (copy / "shop").mkdir()
    (copy / "shop" / "__init__.py").write_text("")
    (copy / "shop" / "models.py").write_text(MODELS)
    ini = copy / "alembic.ini"
    ini.write_text(
        ini.read_text().replace("= dbsession:Base.metadata", "= shop.models:Base.metadata")
    )
    for step in (["upgrade"], ["revision", "--autogenerate", "-m", "product"], ["upgrade"]):
        assert run("dbsession", *step, cwd=copy).returncode == 0
    assert run("dbsession", "check", cwd=copy).returncode == 0
    with open(copy / "shop" / "models.py", "a") as models:
        models.write(DRIFT)

    result = run("dbsession", "check", cwd=copy)

    assert result.returncode == 1
    listed = (  # Alembic's error carries the differences from 1.15 on
        ": + table tag (id, label); + column product.title"
        if tuple(int(part) for part in version("alembic").split(".")[:2]) >= (1, 15)
        else " (Alembic < 1.15 does not say which: 'alembic check' prints them)"
    )
    assert result.stderr.strip() == (
        f"dbsession check: the models differ from the migrations{listed}. Create a revision "
        "for them ('dbsession revision --autogenerate -m ...'), or change the models back."
    )
