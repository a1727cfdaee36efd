"""Observability of async units of work: the span and the slow-scope warning."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text

from dbsession import observability
from dbsession.asyncio import AsyncDbSessionFactory

from .conftest import Run


@pytest.fixture(autouse=True)
def _observability_restored() -> Iterator[None]:
    yield
    observability.configure()


def test_async_unit_of_work_gets_a_span_and_a_slow_warning(
    async_factory: AsyncDbSessionFactory, run: Run[Any], caplog: pytest.LogCaptureFixture
) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    observability.configure(slow_scope_seconds=0.1, opentelemetry=True, tracer_provider=provider)

    async def body() -> None:
        async with async_factory.session_scope() as session:
            await session.execute(text("SELECT 1"))
            await asyncio.sleep(0.3)

    with caplog.at_level(logging.WARNING, logger="dbsession"):
        run(body())
    (unit,) = [s for s in spans.get_finished_spans() if s.name == "dbsession.unit_of_work"]
    assert unit.attributes is not None
    assert unit.attributes["dbsession.outcome"] == "committed"
    assert unit.attributes["db.system"] == async_factory.url.get_backend_name()
    warnings = [m for m in caplog.messages if "unit of work opened at" in m]
    assert len(warnings) == 1
    assert __file__ in warnings[0] and "OUTSIDE the database" in warnings[0]
