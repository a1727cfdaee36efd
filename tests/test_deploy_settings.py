"""The deployment settings: what reaches the driver, and what is refused early."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL

from dbsession import ConfigurationError, DbSessionFactory, Timeouts
from dbsession.errors import ScopeError


def _driver_connection(factory: DbSessionFactory) -> Any:
    with factory.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        return conn.connection.driver_connection


@pytest.mark.backends("postgresql")
@pytest.mark.parametrize(
    ("pooler", "threshold"), [(None, None), ("transaction", None), ("session", 5), ("none", 5)]
)
def test_prepared_statements_are_off_unless_no_transaction_pooler_is_declared(
    backend_url: URL, pooler: str | None, threshold: int | None
) -> None:
    factory = DbSessionFactory(backend_url, pooler=pooler)
    try:
        assert _driver_connection(factory).prepare_threshold == threshold
    finally:
        factory.dispose()


@pytest.mark.backends("postgresql")
def test_connect_args_given_by_the_user_win(backend_url: URL) -> None:
    factory = DbSessionFactory(backend_url, connect_args={"prepare_threshold": 2})
    try:
        assert _driver_connection(factory).prepare_threshold == 2
    finally:
        factory.dispose()


@pytest.mark.backends("postgresql")
def test_psycopg_gets_connect_timeout_and_keepalives(backend_url: URL) -> None:
    factory = DbSessionFactory(backend_url, timeouts=Timeouts(connect=3, dead_peer=12))
    try:
        params = _driver_connection(factory).info.get_parameters()
    finally:
        factory.dispose()
    assert (params["connect_timeout"], params["keepalives_idle"]) == ("3", "6")
    assert (params["keepalives"], params["tcp_user_timeout"]) == ("1", "12000")


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"pooler": "pgbouncer"}, "pooler="),
        ({"timeouts": None, "max_replica_lag": 1}, "max_replica_lag="),
        ({"replica_url": "mysql+pymysql://h/db", "max_replica_lag": 1}, "postgresql"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_them(
    options: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigurationError, match=named):
        DbSessionFactory("sqlite://", **options)


@pytest.mark.parametrize("field", ["connect", "dead_peer", "read", "ping"])
def test_timeouts_must_be_positive(field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        Timeouts(**{field: 0})


def test_a_scope_timeout_must_be_positive(tmp_path: Any) -> None:
    factory = DbSessionFactory(f"sqlite:///{tmp_path}/t.db")
    try:
        with pytest.raises(ConfigurationError, match="timeout"):
            with factory.session_scope(timeout=-1):
                pass
    finally:
        factory.dispose()


@pytest.mark.parametrize("option", [{"timeout": 1}, {"replica": False}])
def test_a_savepoint_cannot_have_its_own_budget_or_server(
    tmp_path: Any, option: dict[str, Any]
) -> None:
    factory = DbSessionFactory(f"sqlite:///{tmp_path}/t.db")
    try:
        with factory.session_scope():
            with pytest.raises(ScopeError, match="independent=True"):
                with factory.session_scope(**option):
                    pass
    finally:
        factory.dispose()
