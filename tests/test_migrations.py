"""Alembic migrations: round trips, agreement with the models, the lock, the command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from dbsession import Base, DbSessionFactory, SchemaNotAtHeadError, migrations
from dbsession.cli import main as cli
from dbsession.errors import MigrationsNotFoundError, UnknownRevisionError

ROOT = Path(__file__).resolve().parents[1]
INI = ROOT / "alembic.ini"
TABLES = {"customer", "supplier", "orders"}


def tables(url: URL) -> set[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_upgrade_to_head_and_downgrade_to_base_round_trip(db_url: URL) -> None:
    assert migrations.current(url=db_url) is None
    migrations.upgrade(url=db_url, migrations=INI)
    assert TABLES <= tables(db_url)
    assert migrations.current(url=db_url) == migrations.head(migrations=INI)
    migrations.downgrade("base", url=db_url, migrations=INI)
    assert not TABLES & tables(db_url)
    assert migrations.current(url=db_url) is None
    migrations.upgrade(url=db_url, migrations=INI)
    assert migrations.is_at_head(url=db_url, migrations=INI)


def test_migrations_and_models_agree(db_url: URL) -> None:
    migrations.upgrade(url=db_url, migrations=INI)
    engine = create_engine(db_url, poolclass=NullPool)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_constraint_names_are_deterministic(db_url: URL) -> None:
    migrations.upgrade(url=db_url, migrations=INI)
    engine = create_engine(db_url, poolclass=NullPool)
    inspector = inspect(engine)
    fks = {fk["name"] for fk in inspector.get_foreign_keys("orders")}
    uniques = {uq["name"] for uq in inspector.get_unique_constraints("customer")}
    engine.dispose()
    assert fks == {"fk_orders_customer_id_customer", "fk_orders_supplier_id_supplier"}
    assert "uq_customer_email" in uniques


def test_there_is_a_single_head() -> None:
    assert migrations.head(migrations=INI) == "0001"


def test_require_head_names_current_and_head(db_url: URL) -> None:
    with pytest.raises(SchemaNotAtHeadError, match="at revision <base>.*head is 0001") as caught:
        migrations.require_head(url=db_url, migrations=INI)
    assert (caught.value.current, caught.value.head) == (None, "0001")
    migrations.upgrade(url=db_url, migrations=INI)
    migrations.require_head(url=db_url, migrations=INI)


def test_global_init_can_require_a_migrated_schema(
    db_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(SchemaNotAtHeadError):
        DbSessionFactory.global_init(db_url, require_migrated=True)
    DbSessionFactory.global_dispose(allow_lazy=True)
    migrations.upgrade(url=db_url, migrations=INI)
    assert DbSessionFactory.global_init(db_url, require_migrated=True).url == db_url


def test_offline_mode_prints_the_sql(backend_url: URL, capsys: pytest.CaptureFixture[str]) -> None:
    migrations.upgrade(url=backend_url, migrations=INI, sql=True)
    out = capsys.readouterr().out
    assert "CREATE TABLE customer" in out
    assert "CONSTRAINT fk_orders_customer_id_customer" in out
    assert migrations.current(url=backend_url) is None  # nothing was run


def upgrade_at_once(url: URL, cwd: Path, count: int = 4) -> None:
    """Run ``dbsession upgrade`` in ``count`` processes at once: all succeed, one migrates."""
    shown = url.render_as_string(hide_password=False)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dbsession", "--url", shown, "--migrations", str(INI)]
            + ["upgrade"],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(count)
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * count, outputs
    assert sum("Running upgrade" in out for out in outputs) == 1, outputs


def test_four_processes_upgrading_at_once_migrate_once(db_url: URL, tmp_path: Path) -> None:
    upgrade_at_once(db_url, tmp_path)
    engine = create_engine(db_url, poolclass=NullPool)
    with engine.connect() as conn:
        assert list(conn.scalars(text("SELECT version_num FROM alembic_version"))) == ["0001"]
    engine.dispose()
    assert TABLES <= tables(db_url)


@pytest.mark.parametrize("password", ["pct%sign", "at@sign", "colon:sign", "slash/sign"])
def test_passwords_with_special_characters_reach_the_database(
    mysql_url: URL, password: str, tmp_path: Path
) -> None:
    user = f"dbs_{uuid.uuid4().hex[:8]}"
    url = mysql_url.set(username=user, password=password)
    raw = url.render_as_string(hide_password=False)  # percent-encoded, as a user writes it
    assert make_url(raw).password == password
    admin = create_engine(mysql_url, poolclass=NullPool)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE USER '{user}'@'%' IDENTIFIED BY :pw"), {"pw": password})
        conn.execute(text(f"GRANT ALL ON {mysql_url.database}.* TO '{user}'@'%'"))
    try:
        result = run(
            "-m", "dbsession", "--url", raw, "--migrations", str(INI), "upgrade", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
        assert password not in result.stdout + result.stderr
        wrong = run(
            "-m",
            "dbsession",
            "--url",
            url.set(password="wrong").render_as_string(hide_password=False),
            "current",
            cwd=tmp_path,
        )
        assert wrong.returncode == 1
        assert "Cannot connect" in wrong.stderr
        migrations.downgrade("base", url=raw, migrations=INI)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP USER '{user}'@'%'"))
            conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
        admin.dispose()


def test_password_never_appears_in_alembic_output(postgresql_url: URL, tmp_path: Path) -> None:
    marker = "Pw-MARKER-alembic"
    url = postgresql_url.set(password=marker).render_as_string(hide_password=False)
    result = run("-m", "alembic", "-c", str(INI), "-x", f"url={url}", "upgrade", "head", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "Running upgrade" in result.stderr
    assert marker not in result.stdout + result.stderr
    result = run("-m", "alembic", "-c", str(INI), "-x", f"url={url}", "downgrade", "base", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    migrations.downgrade("base", url=postgresql_url, migrations=INI)


def test_cli_without_migrations_folder_says_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli(["upgrade"]) == 1
    assert "No migrations found" in capsys.readouterr().err
    with pytest.raises(MigrationsNotFoundError):
        migrations.head()


def test_cli_unknown_revision(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.sqlite3'}"
    assert cli(["--url", url, "--migrations", str(INI), "upgrade", "nope"]) == 1
    assert "Can't locate revision identified by 'nope'" in capsys.readouterr().err
    with pytest.raises(UnknownRevisionError):
        migrations.upgrade("nope", url=url, migrations=INI)


def test_cli_unreachable_database(capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql://u:secret-pw@127.0.0.1:1/x"
    assert cli(["--url", url, "--migrations", str(INI), "upgrade"]) == 1
    err = capsys.readouterr().err
    assert "Cannot connect to the postgresql server at 127.0.0.1:1" in err
    assert "secret-pw" not in err


def test_cli_current_check_and_autogenerate_revision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "migrations"
    url = f"sqlite:///{tmp_path / 'app.sqlite3'}"
    assert cli(["init", str(folder)]) == 0
    metadata = "dbsession.example.models:Base.metadata"
    common = ["--url", url, "--migrations", str(folder), "--metadata", metadata]
    assert cli([*common, "revision", "--autogenerate", "-m", "first"]) == 0
    assert cli([*common, "upgrade"]) == 0
    assert cli([*common, "check"]) == 0
    capsys.readouterr()
    assert cli([*common, "current"]) == 0
    assert capsys.readouterr().out.strip() == migrations.head(migrations=folder)


def test_import_dbsession_registers_no_example_tables(tmp_path: Path) -> None:
    code = "import dbsession, sys; sys.exit(len(dbsession.Base.metadata.tables))"
    result = run("-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_main_job_runs_twice_from_a_fresh_directory(tmp_path: Path) -> None:
    for _ in range(2):
        result = run("-m", "dbsession.example", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "unit of work 1: committed" in result.stdout
        assert "nothing of it was kept" in result.stdout
    assert "rows now: customer 4, supplier 4, orders 4" in result.stdout
    assert (tmp_path / "dbsession.sqlite3").exists()


def test_template_workflow_new_model_autogenerate_upgrade(tmp_path: Path) -> None:
    copy = tmp_path / "myservice"
    copy.mkdir()
    for name in ("dbsession", "migrations"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(INI, copy / "alembic.ini")
    with open(copy / "dbsession" / "example" / "models.py", "a") as models:
        models.write(
            "\n\nclass Product(Base):\n"
            '    __tablename__ = "product"\n\n'
            "    id: Mapped[int] = mapped_column(primary_key=True)\n"
            "    title: Mapped[str] = mapped_column(String(200))\n"
        )
    env = {"PYTHONPATH": str(copy)}
    assert run("-m", "alembic", "upgrade", "head", cwd=copy, env=env).returncode == 0
    result = run("-m", "alembic", "revision", "--autogenerate", "-m", "product", cwd=copy, env=env)
    assert result.returncode == 0, result.stderr
    assert "Detected added table 'product'" in result.stderr
    result = run("-m", "alembic", "upgrade", "head", cwd=copy, env=env)
    assert result.returncode == 0, result.stderr
    assert "product" in tables(URL.create("sqlite", database=str(copy / "dbsession.sqlite3")))
