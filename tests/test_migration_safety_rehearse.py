"""``dbsession upgrade --rehearse`` (issue 26): the pending statements, run on a scratch copy,
with the locks they took and the tables they rewrote; the database itself is not changed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from migration_load import TABLE, drop_all, has_note_column, make_migrations
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from dbsession import migrations
from dbsession.cli import main as cli
from dbsession.errors import ConfigurationError

REWRITE = f'''"""a type change that rewrites"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.alter_column("{TABLE}", "amount", existing_type=sa.Integer, type_=sa.BigInteger)
'''


@pytest.fixture
def folder(postgresql_url: URL, tmp_path: Path) -> Iterator[Path]:
    made = make_migrations(tmp_path / "migrations")
    (made / "versions" / "0003_rewrite.py").write_text(REWRITE)
    migrations.upgrade("0001", url=postgresql_url, migrations=made)
    yield made
    drop_all(postgresql_url)


def test_rehearsal_reports_locks_and_rewrites_and_changes_nothing(
    postgresql_url: URL, folder: Path
) -> None:
    rehearsed = migrations.rehearse(url=postgresql_url, migrations=folder, sample=100)
    assert [s.statement.split()[:3] for s in rehearsed] == [["ALTER", "TABLE", TABLE]] * 2
    add, retype = rehearsed
    assert f"ACCESS EXCLUSIVE on {TABLE}" in add.locks
    assert add.rewritten == ()  # a nullable column: no rewrite
    assert retype.rewritten == (TABLE,)  # integer to bigint: the table is copied
    assert migrations.current(url=postgresql_url) == "0001"  # the database is untouched
    assert not has_note_column(postgresql_url)
    engine = create_engine(postgresql_url)
    with engine.connect() as conn:
        left = conn.scalar(
            text("SELECT count(*) FROM pg_database WHERE datname LIKE 'dbsession_rehearsal_%'")
        )
    engine.dispose()
    assert left == 0  # the scratch copy is gone


def test_the_command_prints_each_statement(
    postgresql_url: URL, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = postgresql_url.render_as_string(hide_password=False)
    args = ["--url", url, "--migrations", str(folder), "upgrade", "--rehearse"]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert f"REWROTE {TABLE}" in out
    assert "2 statement(s) rehearsed on a scratch copy; nothing was changed" in out


def test_rehearsal_needs_postgresql(tmp_path: Path) -> None:
    folder = make_migrations(tmp_path / "migrations")
    with pytest.raises(ConfigurationError, match="Rehearsing needs PostgreSQL"):
        migrations.rehearse(url=f"sqlite:///{tmp_path / 'db.sqlite3'}", migrations=folder)
