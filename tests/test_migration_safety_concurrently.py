"""``CONCURRENTLY`` as written (issue 26): ``op.create_index(..., postgresql_concurrently=True)``
runs outside the migration's transaction, holding the migration lock, and an INVALID index
left by a failed concurrent build is rebuilt on the next upgrade."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from migration_load import TABLE, drop_all, make_migrations
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from dbsession import migrations

LOCK_OBJID = 0x64627365  # the migration lock's advisory key (dbsession.migrations)
THIRD = f'''"""a unique index, built concurrently"""
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_index("ix_amount", "{TABLE}", ["amount"], unique=True, postgresql_concurrently=True)
    op.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
        "AND pid = pg_backend_pid() AND objid = {LOCK_OBJID} AND granted) THEN "
        "RAISE EXCEPTION 'the migration lock was lost'; END IF; END $$"
    )


def downgrade() -> None:
    op.drop_index("ix_amount", table_name="{TABLE}", postgresql_concurrently=True)
'''

pytestmark = pytest.mark.backends("postgresql")


@pytest.fixture
def folder(backend_url: URL, tmp_path: Path) -> Iterator[Path]:
    made = make_migrations(tmp_path / "migrations")
    (made / "versions" / "0003_index.py").write_text(THIRD)
    migrations.upgrade("0002", url=backend_url, migrations=made)
    yield made
    drop_all(backend_url)


@pytest.fixture
def engine(backend_url: URL) -> Iterator[Engine]:
    made = create_engine(backend_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    yield made
    made.dispose()


def index_state(engine: Engine) -> bool | None:
    """True: ix_amount is valid; False: INVALID; None: absent."""
    with engine.connect() as conn:
        valid: bool | None = conn.scalar(
            text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('ix_amount')")
        )
    return valid


def test_a_concurrent_index_is_built_outside_the_transaction_under_the_lock(
    backend_url: URL, folder: Path, engine: Engine
) -> None:
    holder = engine.connect()
    holder.execute(text("BEGIN ISOLATION LEVEL REPEATABLE READ"))
    holder.execute(text(f"SELECT count(*) FROM {TABLE}"))  # a snapshot the build must outwait
    failed: list[BaseException] = []

    def run() -> None:
        try:
            migrations.upgrade(url=backend_url, migrations=folder)
        except BaseException as error:
            failed.append(error)

    upgrade = threading.Thread(target=run)
    upgrade.start()
    try:
        builder = None
        for _ in range(300):
            with engine.connect() as conn:
                builder = conn.scalar(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE 'CREATE UNIQUE INDEX CONCURRENTLY%'"
                    )
                )
            if builder is not None or failed:
                break
            time.sleep(0.1)
        assert builder is not None, "the concurrent build never waited for the open snapshot"
        with engine.connect() as conn:
            held = conn.scalar(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND pid = :pid AND objid = :key"
                ),
                {"pid": builder, "key": LOCK_OBJID},
            )
        assert held == 1  # the migration lock, at session level, across the commit
    finally:
        holder.execute(text("COMMIT"))
        holder.close()
        upgrade.join(timeout=120)
    assert failed == []
    assert index_state(engine) is True
    assert migrations.current(url=backend_url) == "0003"
    migrations.downgrade("0002", url=backend_url, migrations=folder)
    assert index_state(engine) is None


def test_an_invalid_index_left_by_a_failed_build_is_rebuilt(
    backend_url: URL, folder: Path, engine: Engine
) -> None:
    with engine.connect() as conn:
        conn.execute(text(f"UPDATE {TABLE} SET amount = 7 WHERE id IN (1, 2)"))  # duplicates
    with pytest.raises(IntegrityError):
        migrations.upgrade(url=backend_url, migrations=folder)
    assert index_state(engine) is False  # what PostgreSQL leaves behind
    assert migrations.current(url=backend_url) == "0002"
    with engine.connect() as conn:
        conn.execute(text(f"UPDATE {TABLE} SET amount = id"))
    migrations.upgrade(url=backend_url, migrations=folder)
    assert index_state(engine) is True
    assert migrations.current(url=backend_url) == "0003"
