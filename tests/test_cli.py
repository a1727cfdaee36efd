"""The ``dbsession`` console script never acts on a database the operator did not name, and
every failure is one line: run as installed (a subprocess from a project folder) and in-process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import URL

from dbsession import DbSessionFactory, SchemaNotAtHeadError, migrations
from dbsession.cli import main as cli
from dbsession.errors import InvalidURLError, MigrationError, MigrationsNotFoundError
from dbsession.example.store import MIGRATIONS as EXAMPLE_MIGRATIONS

SCRIPT = Path(sys.executable).parent / "dbsession"
ROOT = Path(__file__).resolve().parents[1]
INI = ROOT / "alembic.ini"
EXAMPLE = EXAMPLE_MIGRATIONS  # the example's revisions (the template's first one is empty)
SECRET = "CliPw-4b1e"

MODELS = """
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Gadget(Base):
    __tablename__ = "gadget"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
"""


def dbsession(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed console script, as an operator would, in ``cwd``."""
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "DBSESSION_METADATA", "DBSESSION_MIGRATIONS", "PYTHONPATH")
    }
    environment.update(env or {})
    assert SCRIPT.is_file(), f"{SCRIPT} is missing: pip install -e . in this venv"
    return subprocess.run(
        [str(SCRIPT), *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder: a ``myapp`` package with models and a ``dbsession init`` folder."""
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "models.py").write_text(MODELS)
    result = dbsession("init", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return tmp_path


METADATA = {"DBSESSION_METADATA": "myapp.models:Base.metadata"}


def test_the_installed_script_follows_its_own_hints_from_a_project_folder(project: Path) -> None:
    """init's printed commands work as printed, with the models imported from the cwd."""
    init_again = dbsession("init", "other", cwd=project)
    assert "--migrations other" in init_again.stdout
    result = dbsession("revision", "--autogenerate", "-m", "first", cwd=project, env=METADATA)
    assert result.returncode == 0, result.stderr
    assert "Detected added table 'gadget'" in result.stderr
    result = dbsession("upgrade", cwd=project)
    assert result.returncode == 0, result.stderr
    result = dbsession("check", cwd=project, env=METADATA)
    assert result.returncode == 0, result.stderr
    assert "matches the models" in result.stdout


def test_check_without_metadata_does_not_pass_unless_asked_for_the_revision_only(
    project: Path,
) -> None:
    assert dbsession("revision", "-m", "empty", cwd=project).returncode == 0
    assert dbsession("upgrade", cwd=project).returncode == 0
    result = dbsession("check", cwd=project)
    assert result.returncode == 1
    assert "NOT compared" in result.stderr
    assert "matches the models" not in result.stdout
    result = dbsession("check", "--revision-only", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "models not compared" in result.stdout


def test_read_only_commands_create_no_database_and_print_no_alembic_chatter(
    project: Path,
) -> None:
    assert dbsession("revision", "-m", "first", cwd=project).returncode == 0
    for args in (["current"], ["check", "--revision-only"], ["heads"], ["history"], ["show"]):
        result = dbsession(*args, cwd=project)
        assert "Context impl" not in result.stdout + result.stderr, args
        assert not (project / "dbsession.sqlite3").exists(), args
    assert "no database" in dbsession("current", cwd=project).stdout
    assert dbsession("upgrade", cwd=project).returncode == 0
    result = dbsession("current", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "Context impl" not in result.stdout + result.stderr
    assert result.stdout.strip() == migrations.head(migrations=project / "migrations")


@pytest.mark.parametrize(
    "args",
    [
        ["upgrade"],
        ["downgrade", "base"],
        ["stamp", "head"],
        ["current"],
        ["check"],
        ["heads"],
        ["history"],
        ["show"],
        ["revision", "-m", "x"],
        ["merge"],
        ["init", "elsewhere"],
    ],
)
def test_every_command_refuses_an_empty_url(
    args: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--url "$STAGING_URL"`` with the variable empty never falls back to DATABASE_URL."""
    other = tmp_path / "production.sqlite3"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{other}")
    monkeypatch.chdir(tmp_path)
    for argv in (["--url", "", *args], [*args, "--url", " "]):
        assert cli(argv) == 1
        assert "--url is empty" in capsys.readouterr().err
    assert not other.exists()
    assert not (tmp_path / "dbsession.sqlite3").exists()
    assert not (tmp_path / "elsewhere").exists()


def test_migrations_upgrade_and_downgrade_refuse_an_empty_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "production.sqlite3"
    migrations.upgrade(url=f"sqlite:///{other}", migrations=INI)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{other}")
    with pytest.raises(InvalidURLError, match="empty"):
        migrations.downgrade("base", url="", migrations=INI)
    with pytest.raises(InvalidURLError, match="empty"):
        migrations.upgrade(url="  ", migrations=INI)
    assert migrations.current(url=f"sqlite:///{other}") == migrations.head(migrations=INI)


def test_downgrade_names_the_database_masked_before_acting(
    postgresql_url: URL, tmp_path: Path
) -> None:
    url = postgresql_url.set(password=SECRET).render_as_string(hide_password=False)
    upgrade = dbsession("--migrations", str(INI), "upgrade", "--url", url, cwd=tmp_path)
    assert upgrade.returncode == 0, upgrade.stderr
    result = dbsession("downgrade", "base", "--url", url, "--migrations", str(INI), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    announced, _, ran = result.stderr.partition("Running downgrade")
    assert f"downgrading {postgresql_url.set(password='***')}" in announced.replace("%2A", "*")
    assert "(from argument) to base" in announced
    assert ran
    assert SECRET not in result.stdout + result.stderr


def test_global_options_are_accepted_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'app.sqlite3'}"
    assert cli(["upgrade", "--url", url, "--migrations", str(INI)]) == 0
    assert cli(["current", "--url", url]) == 0
    assert capsys.readouterr().out.strip() == migrations.head(migrations=INI)


def test_a_usage_error_never_echoes_a_password(tmp_path: Path) -> None:
    result = dbsession(f"postgresql://app:{SECRET}@db/app", "upgrade", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    assert SECRET not in result.stderr


def test_several_heads_get_a_merge_command_that_works_and_zero_heads_are_not_several(
    project: Path,
) -> None:
    result = dbsession("check", "--revision-only", cwd=project)
    assert result.returncode == 1
    assert "has no revision yet" in result.stderr
    assert "0 heads" not in result.stderr
    assert dbsession("revision", "-m", "one", cwd=project).returncode == 0
    config = migrations.make_config(project / "migrations")
    migrations.run_command(command.revision, config, message="two", head="base", splice=True)
    result = dbsession("check", "--revision-only", cwd=project)
    assert result.returncode == 1
    assert "2 heads" in result.stderr
    hint = result.stderr.split("'")[-4]
    assert hint == "dbsession merge -m merge", result.stderr
    result = dbsession(*hint.split()[1:], cwd=project)
    assert result.returncode == 0, result.stderr
    assert dbsession("upgrade", cwd=project).returncode == 0
    assert dbsession("check", "--revision-only", cwd=project).returncode == 0


def test_stamp_and_show(project: Path) -> None:
    assert dbsession("revision", "-m", "first", cwd=project).returncode == 0
    head = migrations.head(migrations=project / "migrations")
    result = dbsession("stamp", "head", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "stamping sqlite:///" in result.stderr
    assert dbsession("current", cwd=project).stdout.strip() == head
    result = dbsession("show", head, cwd=project)
    assert result.returncode == 0, result.stderr
    assert f"Rev: {head}" in result.stdout


FAILING_MIGRATION = """
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade():
    op.execute("SELECT * FROM no_such_table_here")
"""

FIRST_MIGRATION = """
revision = "0001"
down_revision = None


def upgrade():
    pass
"""


def _failing_migration(project: Path) -> list[str]:
    versions = project / "migrations" / "versions"
    (versions / "0001_first.py").write_text(FIRST_MIGRATION)
    (versions / "0002_broken.py").write_text(FAILING_MIGRATION)
    return ["upgrade"]


def _raising_models(project: Path) -> list[str]:
    (project / "myapp" / "broken.py").write_text("raise RuntimeError('models exploded')\n")
    return ["--metadata", "myapp.broken:Base.metadata", "revision", "--autogenerate", "-m", "x"]


def _percent_in_ini_path(project: Path) -> list[str]:
    folder = project / "dir%x"
    folder.mkdir()
    (folder / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s/migrations\n")
    return ["--migrations", str(folder / "alembic.ini"), "heads"]


@pytest.mark.parametrize(
    "make_args",
    [
        _failing_migration,
        _raising_models,
        _percent_in_ini_path,
        lambda project: ["--metadata", ":Base", "revision", "--autogenerate", "-m", "x"],
        lambda project: ["--metadata", ".rel:Base", "revision", "--autogenerate", "-m", "x"],
        lambda project: ["init", "/proc/x"],
    ],
    ids=["failing-migration", "raising-models", "percent-in-ini", "no-module", "relative", "init"],
)
def test_each_failure_is_one_line_and_exit_1_with_the_story_behind_traceback(
    project: Path, make_args: object
) -> None:
    assert callable(make_args)
    args: list[str] = make_args(project)
    result = dbsession(*args, cwd=project)
    assert result.returncode == 1
    progress = ("Running ", "dbsession: ")  # Alembic's steps; the line naming the database
    lines = [line for line in result.stderr.splitlines() if not line.startswith(progress)]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dbsession "), result.stderr
    assert "Traceback" not in result.stderr
    result = dbsession("--traceback", *args, cwd=project)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr


def test_global_init_require_migrated_takes_the_migrations_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app started from another folder (systemd, gunicorn --chdir) names its migrations."""
    url = f"sqlite:///{tmp_path / 'app.sqlite3'}"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MigrationsNotFoundError, match="migrations="):
        DbSessionFactory.global_init(url, require_migrated=True)
    DbSessionFactory.global_dispose(allow_lazy=True)
    with pytest.raises(SchemaNotAtHeadError):
        DbSessionFactory.global_init(url, require_migrated=True, migrations=EXAMPLE)
    DbSessionFactory.global_dispose(allow_lazy=True)
    migrations.upgrade(url=url, migrations=EXAMPLE)
    factory = DbSessionFactory.global_init(url, require_migrated=True, migrations=EXAMPLE)
    with factory.engine.connect() as connection:
        assert connection.execute(text("SELECT COUNT(*) FROM customer")).scalar() == 0


@pytest.fixture
def _no_metadata_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("DBSESSION_METADATA", raising=False)
    yield


@pytest.mark.usefixtures("_no_metadata_env")
def test_migration_error_hints_do_not_mention_files_init_does_not_write(project: Path) -> None:
    result = dbsession("revision", "--autogenerate", "-m", "x", cwd=project)
    assert result.returncode == 1
    assert "alembic.ini" not in result.stderr
    with pytest.raises(MigrationError) as caught:
        migrations.head(migrations=project / "migrations")
    assert "alembic" not in str(caught.value)
    assert "dbsession revision" in textwrap.shorten(str(caught.value), 500)
