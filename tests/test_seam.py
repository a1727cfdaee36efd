"""The one seam to SQLAlchemy's internals (``dbsession._seam``): every entry point it hooks
is still reached by the SQLAlchemy installed (CI runs this on the floor and the newest
versions), a hook on a method SQLAlchemy dropped fails at engine creation, and no other
module of the package touches SQLAlchemy's internals."""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, event, insert, text, update
from sqlalchemy.engine import URL

import dbsession
from dbsession import DbSessionFactory, Timeouts, _seam
from dbsession._seam import ORDER, flagged_view, set_driver_read_only, set_hook
from dbsession.errors import PoolExhaustedError

PACKAGE = Path(dbsession.__file__).parent


@pytest.fixture
def reached(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Any], Counter[str]]]:
    """Install, outermost on every hooked dialect method of an engine, a probe that counts
    the calls SQLAlchemy makes to it."""
    for method, names in list(ORDER.items()):
        monkeypatch.setitem(ORDER, method, ("probe", *names))

    def probe(engine: Any) -> Counter[str]:
        calls: Counter[str] = Counter()
        for method in ORDER:

            def hook(call_next: Callable[..., Any], method: str = method) -> Callable[..., Any]:
                def counted(*args: Any) -> Any:
                    calls[method] += 1
                    return call_next(*args)

                return counted

            set_hook(engine, method, "probe", hook)
        return calls

    yield probe


def test_sqlalchemy_reaches_every_hooked_dialect_method(
    backend_url: URL, reached: Callable[[Any], Counter[str]]
) -> None:
    """begin, commit, rollback, the three execute paths and the ping: were one bypassed,
    its hook would silently stop working (a connection lost during COMMIT then looks
    lost before it, and the unit is applied twice)."""
    factory = DbSessionFactory(backend_url, timeouts=Timeouts(ping_after_idle=0))
    table = Table("seam_probe", MetaData(), Column("id", Integer, primary_key=True))
    try:
        table.create(factory.engine)
        calls = reached(factory.engine)
        with factory.session_scope() as session:
            session.execute(insert(table), [{"id": 1}, {"id": 2}])
            session.execute(update(table).where(table.c.id == 1), {"id": 3})
            session.connection().exec_driver_sql(
                "SELECT 1", execution_options={"no_parameters": True}
            )
            session.execute(text("SELECT id FROM seam_probe WHERE id = :id"), {"id": 2})
        with pytest.raises(RuntimeError), factory.session_scope() as session:
            session.execute(text("SELECT 1"))
            raise RuntimeError("roll back")
        with factory.engine.connect() as connection:
            connection.execute(
                text("UPDATE seam_probe SET id = id WHERE id = :id"), [{"id": 2}, {"id": 3}]
            )
        server = factory.engine.dialect.name != "sqlite"
        with factory.session_scope() as session:  # pinged after its idle time (0 s)
            session.execute(text("SELECT 1"))
        expected = {
            "do_begin",
            "do_commit",
            "do_rollback",
            "do_execute",
            "do_execute_no_params",
            "do_executemany",
        } | ({"do_ping"} if server else set())
        assert expected <= {method for method, count in calls.items() if count}, calls
    finally:
        table.drop(factory.engine)
        factory.dispose()


def test_a_hook_on_a_method_sqlalchemy_no_longer_has_fails_at_engine_creation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(ORDER, "do_vanished", ("probe",))
    factory = DbSessionFactory(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    try:
        with pytest.raises(RuntimeError, match="do_vanished"):
            set_hook(factory.engine, "do_vanished", "probe", lambda call_next: call_next)
        with pytest.raises(RuntimeError, match="unknown_hook"):
            set_hook(factory.engine, "do_commit", "unknown_hook", lambda call_next: call_next)
    finally:
        factory.dispose()


def test_a_flagged_view_flags_its_connections_before_begin(backend_url: URL) -> None:
    """SQLAlchemy still makes an OptionEngine's connections with its ``_connection_cls``
    and begins their transactions in ``_begin_impl``, before the ``begin`` listeners."""
    factory = DbSessionFactory(backend_url)
    try:
        view = flagged_view(factory.engine, "seam_flag")
        seen: list[object] = []
        event.listen(view, "begin", lambda c: seen.append(c.connection.info.get("seam_flag")))
        with view.connect() as connection, connection.begin():
            assert connection.connection.info.pop("seam_flag") is True
        with view.execution_options(isolation_level="SERIALIZABLE").connect() as connection:
            connection.begin()  # its views too
            assert connection.connection.info.pop("seam_flag") is True
        with factory.engine.connect() as connection, connection.begin():
            assert "seam_flag" not in connection.connection.info
        assert seen == [True, True]
    finally:
        factory.dispose()


@pytest.mark.backends("postgresql")
def test_the_driver_read_only_flag_begins_a_read_only_transaction(backend_url: URL) -> None:
    """SQLAlchemy's psycopg dialect still sets the flag its ``BEGIN`` carries."""
    factory = DbSessionFactory(backend_url)
    try:
        with factory.engine.connect() as connection:
            driver = connection.connection.dbapi_connection
            set_driver_read_only(connection.dialect, driver, True)
            assert connection.scalar(text("SHOW transaction_read_only")) == "on"
            connection.rollback()
            set_driver_read_only(connection.dialect, driver, False)
            assert connection.scalar(text("SHOW transaction_read_only")) == "off"
    finally:
        factory.dispose()


@pytest.mark.backends("postgresql", "mysql")
def test_the_tracked_pool_sees_every_checkout_return_and_timeout(backend_url: URL) -> None:
    factory = DbSessionFactory(backend_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    try:
        pool: Any = factory.engine.pool
        assert type(pool).__name__.startswith("Tracked")
        assert _seam.max_overflow(pool) == 0
        holding = threading.Event()
        done = threading.Event()

        def hold() -> None:
            with factory.session_scope() as session:
                session.execute(text("SELECT 1"))
                holding.set()
                done.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert holding.wait(10)
            assert pool.__dict__["_dbsession_records"]  # _create_connection was reached
            assert len(_seam.pool_holders(pool)) == 1  # _do_get was reached, in_use is True
            with pytest.raises(PoolExhaustedError, match="test_seam.py"):
                with factory.session_scope() as session:
                    session.execute(text("SELECT 1"))
        finally:
            done.set()
            holder.join()
        assert _seam.pool_holders(pool) == []  # in_use is False once returned
    finally:
        factory.dispose()


#: What only the seam may name: private SQLAlchemy modules, classes and attributes,
#: and dialect attributes written directly.
_INTERNALS = re.compile(
    r"OptionEngine|_connection_cls|_option_cls|_has_events|_do_get|_do_return_conn|in_use"
    r"|_create_connection|greenlet_spawn"
    r"|_max_overflow|_is_async|await_only|_close_state|setattr\(dialect|vars\(\w*dialect"
    r"|from sqlalchemy(\.\w+)*\._|import sqlalchemy(\.\w+)*\._|sqlalchemy\.engine\.base"
)


def test_no_module_but_the_seam_touches_sqlalchemys_internals() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "_seam.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _INTERNALS.search(line)
    ]
    assert offenders == []
