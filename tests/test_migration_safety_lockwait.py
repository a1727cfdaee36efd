"""The lock-safe runner (issue 26): a migration blocked by a long transaction gives way to
the traffic instead of stalling it, tries again, and names the blocker when it gives up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from migration_load import drop_all, has_note_column, make_migrations, stall
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError

from dbsession import migrations
from dbsession.cli import main as cli
from dbsession.errors import ConfigurationError, MigrationBlockedError
from dbsession.migrations import LockWait

#: Slack over the lock wait for a read to finish once the blocked ALTER gave up: generous,
#: for a loaded machine (a read alone takes about a millisecond).
SLACK = 2.5
HOLD = 8.0  # seconds the long transaction stays open


@pytest.fixture
def folder(backend_url: URL, tmp_path: Path) -> Iterator[Path]:
    """The two-revision folder, upgraded to its first revision; everything dropped after."""
    made = make_migrations(tmp_path / "migrations")
    migrations.upgrade("0001", url=backend_url, migrations=made)
    yield made
    drop_all(backend_url)


@pytest.mark.slow
@pytest.mark.backends("postgresql", "mysql")
def test_traffic_never_waits_longer_than_the_lock_wait(backend_url: URL, folder: Path) -> None:
    policy = LockWait(seconds=1.0, attempts=30, backoff=0.25, max_backoff=1.0)
    outcome = stall(backend_url, folder, lock_wait=policy, hold=HOLD)
    assert outcome.error is None, outcome.error
    assert has_note_column(backend_url)
    assert migrations.current(url=backend_url) == "0002"
    assert outcome.read_errors == 0
    assert outcome.reads > 0
    # The ALTER outwaited the transaction (it ended after HOLD s) by retrying ...
    assert outcome.upgrade_seconds > policy.seconds
    # ... and no read ever queued behind it for longer than one lock wait (plus slack).
    assert outcome.longest_read < policy.seconds + SLACK < HOLD


@pytest.mark.slow
@pytest.mark.backends("postgresql", "mysql")
def test_a_lock_never_released_fails_naming_the_holder(backend_url: URL, folder: Path) -> None:
    policy = LockWait(seconds=0.5, attempts=2, backoff=0.1)
    outcome = stall(backend_url, folder, lock_wait=policy, hold=None)
    error = outcome.error
    assert isinstance(error, MigrationBlockedError), error
    assert isinstance(error, OperationalError)  # the class plain SQLAlchemy code catches
    assert error.attempts == 2
    assert outcome.holder in [blocker.pid for blocker in error.blockers]
    assert f"server process {outcome.holder} " in str(error)
    assert "lockwait_orders" in str(error)  # the statement that waited
    assert not has_note_column(backend_url)  # nothing of the revision stayed
    assert migrations.current(url=backend_url) == "0001"
    assert outcome.read_errors == 0
    assert outcome.longest_read < max(1.0, policy.seconds) + SLACK
    # Once the transaction is gone, the same upgrade goes through.
    migrations.upgrade(url=backend_url, migrations=folder, lock_wait=policy)
    assert has_note_column(backend_url)


def test_the_lock_wait_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert LockWait().seconds == 3.0 and LockWait().attempts == 5
    with pytest.raises(ConfigurationError, match="attempts=0"):
        LockWait(attempts=0)
    with pytest.raises(ConfigurationError, match="seconds=-1"):
        LockWait(seconds=-1)
    with pytest.raises(ConfigurationError, match="lock_wait='3'"):
        migrations.upgrade(lock_wait="3")  # type: ignore[arg-type]
    monkeypatch.setenv("DBSESSION_MIGRATION_LOCK_WAIT", "soon")
    with pytest.raises(ConfigurationError, match="DBSESSION_MIGRATION_LOCK_WAIT='soon'"):
        migrations.upgrade()


def test_the_command_line_takes_the_lock_wait(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_migrations(tmp_path / "migrations")
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    base = ["--url", url, "--migrations", str(folder)]
    assert cli([*base, "upgrade", "--lock-wait", "-1"]) == 1
    assert "--lock-wait=-1.0: give a number of seconds >= 0" in capsys.readouterr().err
    assert cli([*base, "upgrade", "--lock-attempts", "0"]) == 1
    assert "LockWait(attempts=0)" in capsys.readouterr().err
    assert cli([*base, "upgrade", "--lock-wait", "2", "--lock-attempts", "3"]) == 0
    assert migrations.current(url=url) == "0002"


def test_alembic_x_lock_wait_is_read_and_checked(tmp_path: Path) -> None:
    import argparse

    from alembic import command

    folder = make_migrations(tmp_path / "migrations")
    config = migrations.make_config(folder, url=f"sqlite:///{tmp_path / 'db.sqlite3'}")
    config.cmd_opts = argparse.Namespace(x=["lock_wait=soon"])
    with pytest.raises(ConfigurationError, match="-x lock_wait='soon'"):
        command.upgrade(config, "head")
    config.cmd_opts = argparse.Namespace(x=["lock_wait=2"])
    command.upgrade(config, "head")
    assert migrations.current(url=f"sqlite:///{tmp_path / 'db.sqlite3'}") == "0002"
