"""observability.configure() at any moment never changes a scope's outcome: threads open
units of work (committing or rolling back) while another thread switches between every
configuration; each scope reports exactly what the database kept, and nothing
observability does escapes a scope."""

from __future__ import annotations

import logging
import random
import threading
import time

import pytest
from helpers import Planned, observability_configurations, reconfiguring
from sqlalchemy import select
from sqlalchemy.engine import Engine

from dbsession import DbSessionFactory, observability
from dbsession.example.models import Supplier

WORKERS = 4
SCOPES_PER_WORKER = 40


def kept_names(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(select(Supplier.name)))


def test_reconfiguring_under_concurrent_threads_never_changes_an_outcome(
    factory: DbSessionFactory,
) -> None:
    reported: dict[str, str] = {}  # supplier name -> what its scope reported
    escaped: list[BaseException] = []

    def worker(number: int) -> None:
        chooser = random.Random(number)
        for index in range(SCOPES_PER_WORKER):
            name = f"t{number}-{index}"
            fail = chooser.random() < 0.3
            try:
                with factory.session_scope() as session:
                    session.add(Supplier(name=name))
                    session.flush()
                    time.sleep(chooser.uniform(0, 0.002))
                    if fail:
                        raise Planned(name)
                reported[name] = "committed"
            except Planned:
                reported[name] = "rolled back"
            except BaseException as error:  # anything else: observability broke the scope
                escaped.append(error)
                reported[name] = "raised"

    with reconfiguring(seed=7):
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(WORKERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert escaped == []
    assert len(reported) == WORKERS * SCOPES_PER_WORKER
    committed = {name for name, outcome in reported.items() if outcome == "committed"}
    assert kept_names(factory.engine) == committed
    assert 0 < len(committed) < len(reported)  # both outcomes were exercised


def test_configure_inside_a_traced_unit_of_work_leaves_its_outcome_alone(
    factory: DbSessionFactory,
) -> None:
    """The issue's repro: OpenTelemetry turned off while a traced unit of work is open."""
    turn_on_opentelemetry = observability_configurations()[0]
    turn_on_opentelemetry()
    try:
        with factory.session_scope() as session:
            session.add(Supplier(name="traced"))
            observability.configure()
    finally:
        observability.configure()
    assert kept_names(factory.engine) == {"traced"}


class _BrokenTracer:
    def start_span(self, *args: object, **kwargs: object) -> object:
        raise RuntimeError("exporter down")


class _BrokenTracerProvider:
    def get_tracer(self, *args: object, **kwargs: object) -> _BrokenTracer:
        return _BrokenTracer()


def test_a_tracer_that_raises_is_logged_and_the_scope_commits(
    factory: DbSessionFactory, caplog: pytest.LogCaptureFixture
) -> None:
    observability.configure(opentelemetry=True, tracer_provider=_BrokenTracerProvider())
    try:
        with caplog.at_level(logging.ERROR, logger="dbsession"):
            with factory.session_scope() as session:
                session.add(Supplier(name="untraced"))
    finally:
        observability.configure()
    assert kept_names(factory.engine) == {"untraced"}
    assert any("could not start a span" in m for m in caplog.messages)
