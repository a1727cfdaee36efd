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
from helpers import TABLES, tables, upgrade_at_once
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from dbsession import DbSessionFactory, SchemaNotAtHeadError, migrations
from dbsession.cli import main as cli
from dbsession.errors import MigrationsNotFoundError, UnknownRevisionError
from dbsession.example.models import Base
from dbsession.example.store import MIGRATIONS as EXAMPLE

#: The template's own alembic.ini (its first revision is empty; the example's are packaged).
TEMPLATE_INI = Path(__file__).resolve().parents[1] / "alembic.ini"

ROOT = Path(__file__).resolve().parents[1]


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
    migrations.upgrade(url=db_url, migrations=EXAMPLE)
    assert TABLES <= tables(db_url)
    assert migrations.current(url=db_url) == migrations.head(migrations=EXAMPLE)
    migrations.downgrade("base", url=db_url, migrations=EXAMPLE)
    assert not TABLES & tables(db_url)
    assert migrations.current(url=db_url) is None
    migrations.upgrade(url=db_url, migrations=EXAMPLE)
    assert migrations.is_at_head(url=db_url, migrations=EXAMPLE)


def test_migrations_and_models_agree(db_url: URL) -> None:
    migrations.upgrade(url=db_url, migrations=EXAMPLE)
    engine = create_engine(db_url, poolclass=NullPool)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_constraint_names_are_deterministic(db_url: URL) -> None:
    migrations.upgrade(url=db_url, migrations=EXAMPLE)
    engine = create_engine(db_url, poolclass=NullPool)
    inspector = inspect(engine)
    fks = {fk["name"] for fk in inspector.get_foreign_keys("orders")}
    uniques = {uq["name"] for uq in inspector.get_unique_constraints("customer")}
    engine.dispose()
    assert fks == {"fk_orders_customer_id_customer", "fk_orders_supplier_id_supplier"}
    assert "uq_customer_email" in uniques


def test_there_is_a_single_head() -> None:
    assert migrations.head(migrations=EXAMPLE) == "0001"


def test_require_head_names_current_and_head(db_url: URL) -> None:
    with pytest.raises(SchemaNotAtHeadError, match="at revision <base>.*head is 0001") as caught:
        migrations.require_head(url=db_url, migrations=EXAMPLE)
    assert (caught.value.current, caught.value.head) == (None, "0001")
    migrations.upgrade(url=db_url, migrations=EXAMPLE)
    migrations.require_head(url=db_url, migrations=EXAMPLE)


def test_global_init_can_require_a_migrated_schema(
    db_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBSESSION_MIGRATIONS", str(EXAMPLE))
    with pytest.raises(SchemaNotAtHeadError):
        DbSessionFactory.global_init(db_url, require_migrated=True)
    DbSessionFactory.global_dispose(allow_lazy=True)
    migrations.upgrade(url=db_url, migrations=EXAMPLE)
    assert DbSessionFactory.global_init(db_url, require_migrated=True).url == db_url


def test_offline_mode_prints_the_sql(backend_url: URL, capsys: pytest.CaptureFixture[str]) -> None:
    migrations.upgrade(url=backend_url, migrations=EXAMPLE, sql=True)
    out = capsys.readouterr().out
    assert "CREATE TABLE customer" in out
    assert "CONSTRAINT fk_orders_customer_id_customer" in out
    assert migrations.current(url=backend_url) is None  # nothing was run


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
            "-m", "dbsession", "--url", raw, "--migrations", str(EXAMPLE), "upgrade", cwd=tmp_path
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
        migrations.downgrade("base", url=raw, migrations=EXAMPLE)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP USER '{user}'@'%'"))
            conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
        admin.dispose()


def test_password_never_appears_in_alembic_output(postgresql_url: URL, tmp_path: Path) -> None:
    marker = "Pw-MARKER-alembic"
    url = postgresql_url.set(password=marker).render_as_string(hide_password=False)
    result = run(
        "-m", "alembic", "-c", str(TEMPLATE_INI), "-x", f"url={url}", "upgrade", "head", cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "Running upgrade" in result.stderr
    assert marker not in result.stdout + result.stderr
    result = run(
        "-m", "alembic", "-c", str(TEMPLATE_INI), "-x", f"url={url}", "downgrade", "base", cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    migrations.downgrade("base", url=postgresql_url, migrations=TEMPLATE_INI)


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
    assert cli(["--url", url, "--migrations", str(EXAMPLE), "upgrade", "nope"]) == 1
    assert "Can't locate revision identified by 'nope'" in capsys.readouterr().err
    with pytest.raises(UnknownRevisionError):
        migrations.upgrade("nope", url=url, migrations=EXAMPLE)


def test_cli_unreachable_database(capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql://u:secret-pw@127.0.0.1:1/x"
    assert cli(["--url", url, "--migrations", str(EXAMPLE), "upgrade"]) == 1
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


def test_template_workflow_new_model_autogenerate_upgrade(tmp_path: Path) -> None:
    copy = tmp_path / "myservice"
    copy.mkdir()
    for name in ("dbsession", "migrations"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    ini = TEMPLATE_INI.read_text().replace(
        "dbsession_metadata = dbsession:Base.metadata",
        "dbsession_metadata = myservice.models:Base.metadata",
    )
    (copy / "alembic.ini").write_text(ini)
    (copy / "myservice").mkdir()
    (copy / "myservice" / "__init__.py").write_text("")
    (copy / "myservice" / "models.py").write_text(
        "from sqlalchemy import String\n"
        "from sqlalchemy.orm import Mapped, mapped_column\n\n"
        "from dbsession import Base\n\n\n"
        "class Product(Base):\n"
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
