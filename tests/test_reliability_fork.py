"""Fork: children of a process that uses dbsession never touch the parent's connections."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from helpers import server_pid, suppliers
from sqlalchemy.engine import Engine

from dbsession import DbSessionFactory
from dbsession.example.models import Supplier

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX only"),
    pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning"),
    pytest.mark.backends("postgresql"),
]


_inherited: DbSessionFactory | None = None  # set before forking; the children use it


def _scope_in_child(n: int) -> tuple[int, int]:
    """Run one writing scope in a forked worker; return (os pid, server backend pid)."""
    assert _inherited is not None
    with _inherited.session_scope() as session:
        session.add(Supplier(name=f"child-{n:02}"))
        return os.getpid(), server_pid(session)


def _idle_connections_in_child() -> int:
    assert _inherited is not None
    return int(_inherited.engine.pool.checkedin())  # type: ignore[attr-defined]


@contextmanager
def inherited(factory: DbSessionFactory) -> Iterator[None]:
    """Make ``factory`` the one forked children use, for the duration of the block."""
    global _inherited
    _inherited = factory
    try:
        yield
    finally:
        _inherited = None


def test_a_forked_child_starts_on_an_empty_pool_and_never_pings_the_parents_socket(
    factory: DbSessionFactory,
) -> None:
    with factory.session_scope() as session:
        parent_backend = server_pid(session)
    assert factory.engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    with inherited(factory), multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_idle_connections_in_child) == 0
        assert pool.apply(_scope_in_child, (0,))[1] != parent_backend
    assert factory.engine.pool.checkedin() == 1  # type: ignore[attr-defined]


def test_four_forked_workers_and_the_parent_all_use_their_own_connections(
    factory: DbSessionFactory, other_connection: Engine
) -> None:
    with factory.session_scope() as session:
        parent_backend = server_pid(session)
    parent_scopes = 0
    with inherited(factory), multiprocessing.get_context("fork").Pool(4) as pool:
        pending = pool.map_async(_scope_in_child, range(40))
        while parent_scopes == 0 or not pending.ready():
            with factory.session_scope() as session:  # meanwhile, on the parent's connection
                session.add(Supplier(name=f"parent-{parent_scopes:04}"))
                assert server_pid(session) == parent_backend
            parent_scopes += 1
        results = pending.get(timeout=60)

    child_backends = {backend for _, backend in results}
    assert len(results) == 40
    assert parent_backend not in child_backends
    assert os.getpid() not in {pid for pid, _ in results}
    with factory.session_scope() as session:
        assert server_pid(session) == parent_backend  # the parent's connection still answers
    assert len(suppliers(other_connection)) == 40 + parent_scopes
