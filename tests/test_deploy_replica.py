"""Read-only scopes on a real streaming replica: routing, read-your-writes on the primary,
SERIALIZABLE, a bound on staleness, the replica down and back, recovery conflicts retried."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from deploy_fixtures import Replica, TcpProxy
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool
from test_deploy_timeouts import BOUND, QUICK, within

from dbsession import DatabaseUnreachableError, DbSessionFactory
from dbsession.asyncio import AsyncDbSessionFactory
from dbsession.errors import UnsupportedIsolationLevelError

pytestmark = pytest.mark.backends("postgresql")

IN_RECOVERY = "SELECT pg_is_in_recovery()"


@pytest.fixture
def standby(replica: Replica, factory: DbSessionFactory) -> Iterator[Engine]:
    """An engine on the replica, once it has replayed the example tables ``factory`` made."""
    engine = create_engine(replica.url(factory.url), poolclass=NullPool)
    caught_up(factory.engine, engine)
    yield engine
    engine.dispose()


def caught_up(primary: Engine, standby: Engine) -> None:
    """Wait until the standby has replayed everything the primary has written so far."""
    with primary.connect() as conn:
        lsn = conn.scalar(text("SELECT pg_current_wal_lsn()"))
    deadline = time.monotonic() + 30
    with standby.connect() as conn:
        while time.monotonic() < deadline:
            replayed = conn.scalar(
                text("SELECT pg_last_wal_replay_lsn() >= CAST(:lsn AS pg_lsn)"), {"lsn": lsn}
            )
            conn.rollback()
            if replayed:
                return
            time.sleep(0.05)
    raise AssertionError("the replica did not catch up within 30 s")


def on_replica(factory: DbSessionFactory, **scope: object) -> bool:
    with factory.session_scope(readonly=True, **scope) as session:  # type: ignore[arg-type]
        return bool(session.scalar(text(IN_RECOVERY)))


@pytest.fixture
def routed(
    factory: DbSessionFactory, replica: Replica, standby: Engine
) -> Iterator[DbSessionFactory]:
    made = DbSessionFactory(factory.url, replica_url=replica.url(factory.url))
    yield made
    made.dispose()


def test_read_only_scopes_use_the_replica_and_replica_false_the_primary(
    routed: DbSessionFactory,
) -> None:
    assert on_replica(routed) is True
    assert on_replica(routed, replica=False) is False
    with routed.session_scope() as session:
        assert session.scalar(text(IN_RECOVERY)) is False


def test_replica_false_reads_see_the_callers_own_commits(routed: DbSessionFactory) -> None:
    missed = 0
    for n in range(200):
        with routed.session_scope() as session:
            session.execute(text("INSERT INTO supplier (name) VALUES (:n)"), {"n": f"s{n}"})
        with routed.session_scope(readonly=True, replica=False) as session:
            found = session.scalar(
                text("SELECT count(*) FROM supplier WHERE name = :n"), {"n": f"s{n}"}
            )
            missed += found != 1
    assert missed == 0


def test_serializable_read_only_scopes_run_on_the_primary_or_fail_named(
    routed: DbSessionFactory,
) -> None:
    assert on_replica(routed, isolation_level="SERIALIZABLE") is False
    with pytest.raises(UnsupportedIsolationLevelError, match="hot standby"):
        on_replica(routed, isolation_level="SERIALIZABLE", replica=True)
    assert on_replica(routed, isolation_level="REPEATABLE READ") is True


def test_max_replica_lag_routes_to_the_primary_while_the_replica_is_behind(
    factory: DbSessionFactory, replica: Replica, standby: Engine
) -> None:
    bounded = DbSessionFactory(factory.url, replica_url=replica.url(factory.url), max_replica_lag=1)
    unbounded = DbSessionFactory(factory.url, replica_url=replica.url(factory.url))
    count = "SELECT count(*) FROM supplier WHERE name = 'late'"
    with standby.connect() as conn:
        conn.execute(text("SELECT pg_wal_replay_pause()"))
        conn.commit()
    try:
        with factory.session_scope() as session:
            session.execute(text("INSERT INTO supplier (name) VALUES ('late')"))
        time.sleep(1.5)  # the replica is now more than a second behind
        with bounded.session_scope(readonly=True) as session:
            assert (session.scalar(text(IN_RECOVERY)), session.scalar(text(count))) == (False, 1)
        with unbounded.session_scope(readonly=True) as session:
            assert (session.scalar(text(IN_RECOVERY)), session.scalar(text(count))) == (True, 0)
    finally:
        with standby.connect() as conn:
            conn.execute(text("SELECT pg_wal_replay_resume()"))
            conn.commit()
    caught_up(factory.engine, standby)
    time.sleep(1.1)  # the lag measured while paused is remembered for a second
    try:
        with bounded.session_scope(readonly=True) as session:
            assert (session.scalar(text(IN_RECOVERY)), session.scalar(text(count))) == (True, 1)
    finally:
        bounded.dispose()
        unbounded.dispose()


def test_replica_down_fails_fast_naming_it_and_back_works(
    factory: DbSessionFactory, replica: Replica, standby: Engine
) -> None:
    proxy = TcpProxy(("127.0.0.1", replica.port))
    replica_url = replica.url(factory.url).set(port=proxy.port)
    plain = DbSessionFactory(factory.url, replica_url=replica_url, timeouts=QUICK)
    fallback = DbSessionFactory(
        factory.url, replica_url=replica_url, timeouts=QUICK, max_replica_lag=5
    )
    try:
        assert on_replica(plain) is True and on_replica(fallback) is True
        proxy.refuse()
        time.sleep(1.1)  # the fallback factory's last lag measurement expires
        with pytest.raises(DatabaseUnreachableError) as raised:
            within(BOUND, lambda: on_replica(plain))
        assert "replica" in str(raised.value) and "replica_url=" in str(raised.value)
        assert on_replica(fallback) is False  # asked for a bound: the primary answers
        with plain.session_scope() as session:  # writing scopes never needed the replica
            assert session.scalar(text(IN_RECOVERY)) is False
        proxy.mode = "forward"
        time.sleep(1.1)
        assert on_replica(plain) is True and on_replica(fallback) is True
    finally:
        plain.dispose()
        fallback.dispose()
        proxy.close()


def test_recovery_conflicts_on_the_replica_are_retried(
    routed: DbSessionFactory, factory: DbSessionFactory
) -> None:
    attempts: list[int] = []

    def lock_on_primary() -> None:
        time.sleep(0.3)
        with factory.engine.begin() as conn:
            conn.execute(text("LOCK TABLE supplier IN ACCESS EXCLUSIVE MODE"))

    def read(session: Session) -> int:
        attempts.append(1)
        rows = int(session.scalar(text("SELECT count(*) FROM supplier")))
        if len(attempts) == 1:  # the replica must cancel this to replay the lock
            threading.Thread(target=lock_on_primary).start()
            session.execute(text("SELECT pg_sleep(20)"))
        return rows

    assert within(BOUND, lambda: routed.transactional(readonly=True)(read)()) == 0
    assert len(attempts) == 2


def test_async_read_only_scopes_route_the_same_way(
    factory: DbSessionFactory, replica: Replica, standby: Engine
) -> None:
    async def main() -> list[bool]:
        made = AsyncDbSessionFactory(factory.url, replica_url=replica.url(factory.url))
        seen = []
        try:
            for replica_choice in (None, False):
                async with made.session_scope(readonly=True, replica=replica_choice) as session:
                    seen.append(bool((await session.execute(text(IN_RECOVERY))).scalar()))
        finally:
            await made.dispose()
        return seen

    assert asyncio.run(main()) == [True, False]
