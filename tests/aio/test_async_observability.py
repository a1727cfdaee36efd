"""Observability of async units of work: the span and the slow-scope warning."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import suppliers
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import event, text
from sqlalchemy.engine import Engine

from dbsession import observability, on_commit
from dbsession.asyncio import AsyncDbSessionFactory
from dbsession.example.models import Supplier

from .conftest import Run


@pytest.fixture(autouse=True)
def _observability_restored() -> Iterator[None]:
    yield
    observability.configure()


def traced(**options: Any) -> InMemorySpanExporter:
    """Trace units of work into memory: ``observability.configure(opentelemetry=True,
    **options)`` with an SDK tracer that keeps its finished spans."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    observability.configure(opentelemetry=True, tracer_provider=provider, **options)
    return spans


def unit_span(spans: InMemorySpanExporter) -> ReadableSpan:
    """The one unit-of-work span ``spans`` finished."""
    (unit,) = [s for s in spans.get_finished_spans() if s.name == "dbsession.unit_of_work"]
    return unit


def test_async_unit_of_work_gets_a_span_and_a_slow_warning(
    async_factory: AsyncDbSessionFactory, run: Run[Any], caplog: pytest.LogCaptureFixture
) -> None:
    spans = traced(slow_scope_seconds=0.1)

    async def body() -> None:
        async with async_factory.session_scope() as session:
            await session.execute(text("SELECT 1"))
            await asyncio.sleep(0.3)

    with caplog.at_level(logging.WARNING, logger="dbsession"):
        run(body())
    unit = unit_span(spans)
    assert unit.attributes is not None
    assert unit.attributes["dbsession.outcome"] == "committed"
    assert unit.attributes["db.system"] == async_factory.url.get_backend_name()
    warnings = [m for m in caplog.messages if "unit of work opened at" in m]
    assert len(warnings) == 1
    assert __file__ in warnings[0] and "OUTSIDE the database" in warnings[0]


def test_a_unit_cancelled_while_its_commit_runs_is_reported_committed(
    async_factory: AsyncDbSessionFactory, run: Run[Any], other_connection: Engine
) -> None:
    """The cancellation waits for the COMMIT in flight, so the unit committed: its hooks
    run, and its span says "committed" (it said "rolled back")."""
    spans = traced()
    hooks: list[int] = []

    async def body() -> None:
        task = asyncio.current_task()
        assert task is not None
        cancel = lambda connection: task.cancel()  # noqa: E731 - just before COMMIT is sent
        event.listen(async_factory.engine.sync_engine, "commit", cancel)
        try:
            async with async_factory.session_scope() as session:
                session.add(Supplier(name="kept"))
                on_commit(lambda: hooks.append(1))
        finally:
            event.remove(async_factory.engine.sync_engine, "commit", cancel)

    with pytest.raises(asyncio.CancelledError):
        run(body())
    assert suppliers(other_connection) == ["kept"] and hooks == [1]
    unit = unit_span(spans)
    assert unit.attributes is not None
    assert unit.attributes["dbsession.outcome"] == "committed"
