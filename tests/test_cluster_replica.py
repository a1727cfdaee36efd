"""A replica that stops streaming is infinitely behind, and ``replica=True`` means the
replica: on the real streaming replica of tests/deploy_fixtures.py, its WAL receiver cut
off from the primary (``primary_conninfo`` pointed at a closed port) while the primary
takes a write."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from deploy_fixtures import Replica
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from dbsession import DbSessionFactory
from dbsession.errors import ReplicaLagError

pytestmark = pytest.mark.backends("postgresql")

IN_RECOVERY = "SELECT pg_is_in_recovery()"
STREAMING = "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'"
LATE = "SELECT count(*) FROM supplier WHERE name = 'late'"


def _until(engine: Engine, sql: str, expected: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while conn.scalar(text(sql)) != expected:
            conn.rollback()
            assert time.monotonic() < deadline, f"{sql} did not become {expected!r}"
            time.sleep(0.1)


@pytest.fixture
def cut_off(replica: Replica, factory: DbSessionFactory) -> Iterator[Engine]:
    """The replica with its WAL receiver disconnected; reconnected and caught up after."""
    standby = create_engine(
        replica.url(factory.url), poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    _until(standby, "SELECT count(*) FROM pg_class WHERE relname = 'supplier'", 1)
    with standby.connect() as conn:
        original = conn.scalar(text("SHOW primary_conninfo"))
        conn.execute(text("ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=1'"))
        conn.execute(text("SELECT pg_reload_conf()"))
    try:
        _until(standby, STREAMING, 0)
        yield standby
    finally:
        with standby.connect() as conn:
            literal = "'" + str(original).replace("'", "''") + "'"  # ALTER SYSTEM takes no $1
            conn.execute(text(f"ALTER SYSTEM SET primary_conninfo = {literal}"))
            conn.execute(text("SELECT pg_reload_conf()"))
        _until(standby, STREAMING, 1)
        standby.dispose()


def test_a_replica_that_is_not_streaming_is_infinitely_behind(
    factory: DbSessionFactory, replica: Replica, cut_off: Engine
) -> None:
    with factory.session_scope() as session:
        session.execute(text("INSERT INTO supplier (name) VALUES ('late')"))
    with cut_off.connect() as conn:  # what the replica has replayed: all it received
        assert conn.scalar(text(LATE)) == 0
        assert conn.scalar(
            text("SELECT pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()")
        )  # the old measure said "lag 0" here
    bounded = DbSessionFactory(factory.url, replica_url=replica.url(factory.url), max_replica_lag=5)
    try:
        with bounded.session_scope(readonly=True) as session:  # served by the primary
            assert (session.scalar(text(IN_RECOVERY)), session.scalar(text(LATE))) == (False, 1)
        with pytest.raises(ReplicaLagError, match="not streaming"):
            with bounded.session_scope(readonly=True, replica=True) as session:
                session.execute(text("SELECT 1"))
    finally:
        bounded.dispose()


def test_replica_true_never_reads_the_primary_while_the_replica_lags(
    factory: DbSessionFactory, replica: Replica
) -> None:
    standby = create_engine(replica.url(factory.url), poolclass=NullPool)
    bounded = DbSessionFactory(factory.url, replica_url=replica.url(factory.url), max_replica_lag=1)
    _until(standby, "SELECT count(*) FROM pg_class WHERE relname = 'supplier'", 1)
    with standby.connect() as conn:
        conn.execute(text("SELECT pg_wal_replay_pause()"))
        conn.commit()
    try:
        with factory.session_scope() as session:
            session.execute(text("INSERT INTO supplier (name) VALUES ('late')"))
        time.sleep(1.5)  # more than a second behind now
        with pytest.raises(ReplicaLagError, match="behind"):
            with bounded.session_scope(readonly=True, replica=True) as session:
                session.execute(text("SELECT 1"))
        with bounded.session_scope(readonly=True) as session:  # unset: the primary
            assert session.scalar(text(IN_RECOVERY)) is False
    finally:
        with standby.connect() as conn:
            conn.execute(text("SELECT pg_wal_replay_resume()"))
            conn.commit()
        bounded.dispose()
        standby.dispose()
