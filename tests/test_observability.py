"""Observability: slow-scope warnings, statistics per call site, pool exhaustion that names
the holders, and OpenTelemetry spans and metrics (with the SDK's in-memory exporters)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError

from dbsession import DbSessionFactory, observability
from dbsession.errors import PoolExhaustedError
from dbsession.example.models import Supplier
from dbsession.integrations.fastapi import DbSession

THIS_FILE = __file__


@pytest.fixture(autouse=True)
def _observability_restored() -> Iterator[None]:
    yield
    observability.configure()
    observability.reset_stats()


def slow_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "unit of work opened at" in r.getMessage()
    ]


def sleep_in_database(factory: DbSessionFactory, seconds: float) -> str:
    """A statement that spends ``seconds`` inside the database on each backend."""
    backend = factory.url.get_backend_name()
    if backend == "sqlite":

        @event.listens_for(factory.engine, "connect")
        def add_sleep(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.create_function("sleep", 1, time.sleep)

        factory.engine.dispose()  # pooled connections get the function too
        return f"SELECT sleep({seconds})"
    if backend == "postgresql":
        return f"SELECT pg_sleep({seconds})"
    return f"SELECT SLEEP({seconds})"


def test_a_scope_that_waits_outside_the_database_is_named_with_its_call_site(
    factory: DbSessionFactory, caplog: pytest.LogCaptureFixture
) -> None:
    observability.configure(slow_scope_seconds=0.2)
    with caplog.at_level(logging.WARNING, logger="dbsession"):
        with factory.session_scope() as session:  # the line the warning names
            line = _line_of("with factory.session_scope() as session:  # the line")
            session.add(Supplier(name="slow"))
            time.sleep(0.4)  # an HTTP call, say, with the transaction open
    (message,) = slow_warnings(caplog)
    assert f"{THIS_FILE}:{line}" in message
    assert "OUTSIDE the database" in message
    assert "(committed)" in message


@pytest.mark.parametrize("independent_scope_first", [False, True])
def test_a_scope_slow_in_the_database_is_told_apart(
    factory: DbSessionFactory, caplog: pytest.LogCaptureFixture, independent_scope_first: bool
) -> None:
    """Also when an independent scope opened inside it ended before its slow statement:
    the statement still counts as the outer scope's time in the database."""
    statement = sleep_in_database(factory, 0.6)
    observability.configure(slow_scope_seconds=0.2)
    with caplog.at_level(logging.WARNING, logger="dbsession"):
        with factory.session_scope() as session:
            if independent_scope_first:
                with factory.session_scope(independent=True, readonly=True) as other:
                    other.execute(text("SELECT 1"))
            session.execute(text(statement))
    (message,) = slow_warnings(caplog)
    assert "most of it in the database" in message


def test_fast_scopes_and_the_off_switch_log_nothing(
    factory: DbSessionFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="dbsession"):
        with factory.session_scope() as session:  # default threshold: 5 s
            session.add(Supplier(name="fast"))
        observability.configure(slow_scope_seconds=None)
        with factory.session_scope():
            time.sleep(0.3)
    assert slow_warnings(caplog) == []
    assert not observability._enabled()


def test_statistics_count_units_per_call_site(factory: DbSessionFactory) -> None:
    observability.configure(stats=True)

    def unit(fail: bool) -> None:
        with factory.session_scope() as session:
            session.add(Supplier(name=f"s{time.perf_counter_ns()}"))
            if fail:
                raise KeyError("boom")

    for fail in (False, False, True):
        try:
            unit(fail)
        except KeyError:
            pass
    (entry,) = [s for s in observability.stats().values() if "test_observability" in s.site]
    assert (entry.count, entry.committed, entry.rolled_back) == (3, 2, 1)
    assert 0 < entry.percentile(0.5) <= entry.percentile(0.99)
    table = observability.format_stats()
    assert entry.site in table and "p99 ms" in table


def test_pool_exhaustion_names_the_checked_out_connections_and_their_holders(
    backend_url: URL,
) -> None:
    factory = DbSessionFactory(backend_url, pool_size=1, max_overflow=0, pool_timeout=0.3)
    caught: list[BaseException] = []

    def second_unit() -> None:
        try:
            with factory.session_scope() as session:
                session.execute(text("SELECT 1"))
        except BaseException as error:
            caught.append(error)

    try:
        with factory.session_scope() as holder:  # holds the only connection
            line = _line_of("with factory.session_scope() as holder:")
            holder.execute(text("SELECT 1"))
            thread = threading.Thread(target=second_unit)
            thread.start()
            thread.join()
    finally:
        factory.dispose()
    (error,) = caught
    assert isinstance(error, PoolExhaustedError)
    assert isinstance(error, SQLAlchemyTimeoutError)  # code written against SQLAlchemy
    assert "1 connections are checked out" in str(error)
    assert f"{THIS_FILE}:{line} (1)" in str(error)


@pytest.mark.backends("postgresql", "mysql")
def test_the_holder_is_named_after_its_connection_was_reopened_at_checkout(
    backend_url: URL,
) -> None:
    """SQLAlchemy clears a record's ``info`` when it reconnects after the checkout: the
    holder lives in ``record_info``, which lasts as long as the record."""
    factory = DbSessionFactory(backend_url, pool_size=1, max_overflow=0, pool_timeout=0.3)
    held, release = threading.Event(), threading.Event()

    def holder_unit() -> None:
        with factory.session_scope() as session:
            session.execute(text("SELECT 1"))
            held.set()
            release.wait(10)

    try:
        with factory.engine.connect() as connection:
            connection.invalidate()  # the next checkout reopens the same record
        holder = threading.Thread(target=holder_unit)
        holder.start()
        try:
            assert held.wait(10)
            with pytest.raises(PoolExhaustedError) as caught:
                with factory.session_scope() as session:
                    session.execute(text("SELECT 1"))
        finally:
            release.set()
            holder.join()
    finally:
        factory.dispose()
    assert "outside any unit of work" not in str(caught.value)
    assert f"{THIS_FILE}:" in str(caught.value)


def test_exhausting_the_read_only_scopes_pool_says_so(backend_url: URL) -> None:
    factory = DbSessionFactory(backend_url, pool_size=1, max_overflow=0, pool_timeout=0.3)
    caught: list[BaseException] = []

    def second_reader() -> None:
        try:
            with factory.session_scope(readonly=True) as session:
                session.execute(text("SELECT 1"))
        except BaseException as error:
            caught.append(error)

    try:
        with factory.session_scope(readonly=True) as holder:
            holder.execute(text("SELECT 1"))
            thread = threading.Thread(target=second_reader)
            thread.start()
            thread.join()
        with factory.session_scope() as writer:  # the writers' pool is another one
            writer.execute(text("SELECT 1"))
    finally:
        factory.dispose()
    (error,) = caught
    assert isinstance(error, PoolExhaustedError)
    assert "of the read-only scopes" in str(error)


@pytest.fixture
def otel() -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader]]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    observability.configure(
        opentelemetry=True,
        tracer_provider=tracer_provider,
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    yield spans, reader
    SQLAlchemyInstrumentor().uninstrument()


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: list(metric.data.data_points)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


def test_one_span_per_unit_of_work_with_statement_spans_nested(
    factory: DbSessionFactory, otel: tuple[InMemorySpanExporter, InMemoryMetricReader]
) -> None:
    spans, reader = otel
    # The instrumentation declares SQLAlchemy < 2.1; its engine events work on 2.1 too.
    SQLAlchemyInstrumentor().instrument(
        engine=factory.engine, tracer_provider=_provider_of(spans), skip_dep_check=True
    )
    with factory.session_scope() as session:
        session.execute(text("SELECT 1"))
    with pytest.raises(KeyError):
        with factory.session_scope(readonly=True) as session:
            session.execute(text("SELECT 2"))
            raise KeyError("boom")
    finished = spans.get_finished_spans()
    units = [s for s in finished if s.name == "dbsession.unit_of_work"]
    assert len(units) == 2
    committed, rolled_back = units
    assert committed.attributes is not None and rolled_back.attributes is not None
    assert committed.attributes["dbsession.outcome"] == "committed"
    assert committed.attributes["db.system"] == factory.url.get_backend_name()
    assert committed.attributes["dbsession.readonly"] is False
    assert rolled_back.attributes["dbsession.outcome"] == "rolled back"
    assert rolled_back.attributes["dbsession.readonly"] is True
    assert rolled_back.attributes["exception.type"] == "KeyError"
    assert "dbsession.pool_wait" in committed.attributes
    statements = [s for s in finished if s.name != "dbsession.unit_of_work"]
    assert statements and all(s.parent is not None for s in statements)
    unit_ids = {u.context.span_id for u in units}
    assert {s.parent.span_id for s in statements if s.parent is not None} <= unit_ids
    points = metric_points(reader)
    assert sum(p.value for p in points["dbsession.commits"]) == 1
    assert sum(p.value for p in points["dbsession.rollbacks"]) == 1
    assert sum(p.count for p in points["dbsession.unit.duration"]) == 2
    assert sum(p.count for p in points["dbsession.pool.wait"]) >= 1


def _provider_of(spans: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider


def _line_of(marker: str) -> int:
    with open(THIS_FILE) as source:
        for number, line in enumerate(source, 1):
            if marker in line and "_line_of" not in line:
                return number
    raise AssertionError(f"{marker!r} not found")


def test_retries_are_counted_by_reason(
    tmp_path: Any, otel: tuple[InMemorySpanExporter, InMemoryMetricReader]
) -> None:
    import sqlite3

    from dbsession import RetryPolicy

    _, reader = otel
    path = tmp_path / "busy.sqlite3"
    factory = DbSessionFactory(f"sqlite:///{path}", sqlite_busy_timeout=0.05)
    factory.create_all(Supplier.metadata)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, held by another connection
    release = threading.Timer(0.3, holder.rollback)
    release.start()
    try:
        patient = RetryPolicy(attempts=100, base_delay=0.01, max_delay=0.05)
        factory.transactional(retry=patient)(lambda s: s.add(Supplier(name="late")))()
    finally:
        release.join()
        holder.close()
        factory.dispose()
    (point, *_) = metric_points(reader)["dbsession.retries"]
    assert point.value >= 1
    assert point.attributes["dbsession.reason"] == "SQLITE_BUSY database is locked"


def test_web_units_of_work_are_named_after_the_view_or_endpoint(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from flask import Flask

    from dbsession.integrations.flask import unit_of_work

    DbSessionFactory.global_init(f"sqlite:///{tmp_path / 'web.sqlite3'}")
    observability.configure(slow_scope_seconds=0.1)
    api = FastAPI()

    @api.get("/slow")
    def slow_endpoint(session: DbSession) -> str:
        time.sleep(0.2)
        return "ok"

    web = Flask(__name__)

    @web.get("/slow")
    @unit_of_work
    def slow_view(session: Any) -> str:
        time.sleep(0.2)
        return "ok"

    with caplog.at_level(logging.WARNING, logger="dbsession"):
        with TestClient(api) as client:
            assert client.get("/slow").status_code == 200
        assert web.test_client().get("/slow").status_code == 200
    view: Any = slow_view
    first_lines = {
        f"{THIS_FILE}:{fn.__code__.co_firstlineno}" for fn in (slow_endpoint, view.__wrapped__)
    }
    named = {m.split("opened at ")[1].split(" ")[0] for m in slow_warnings(caplog)}
    assert named == first_lines
