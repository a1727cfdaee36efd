"""The store example, tested the way an app uses dbsession's pytest plugin.

``db_session`` comes from the plugin: the database is the plugin's (a temporary SQLite
file, or ``--dbsession-url``) migrated with the example's revisions (conftest.py), and
every commit of the example is undone after each test.
"""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from dbsession import DbSessionFactory, session_scope
from dbsession.example.models import Customer
from dbsession.example.store import counts, run

EXPECTED_ROWS = "rows now: customer 2, supplier 2, orders 2"


@pytest.mark.parametrize("attempt", ["first", "second"])
def test_store_example_starts_from_an_empty_database_in_every_test(
    db_session: Session, dbsession_factory: DbSessionFactory, attempt: str
) -> None:
    report = run(dbsession_factory)
    assert "ACME #1" in report  # run number 1: the other attempt's rows are gone
    assert "nothing of it was kept" in report
    assert report.splitlines()[-1] == EXPECTED_ROWS
    assert counts(db_session) == {"customer": 2, "supplier": 2, "orders": 2}


def test_rows_added_by_the_test_are_seen_by_the_apps_session_scope(db_session: Session) -> None:
    db_session.add(Customer(name="Seeded", email="seeded@example.com"))
    db_session.flush()
    with session_scope() as session:
        assert counts(session)["customer"] == 1
