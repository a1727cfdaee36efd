"""The store example's tests: delete this folder together with ``dbsession/example``.

The plugin's database gets the example's own Alembic revisions (shipped inside the
package), not the repository's template migrations.
"""

from __future__ import annotations

import pytest
from sqlalchemy.engine import URL

from dbsession import migrations
from dbsession.example.store import MIGRATIONS


@pytest.fixture(scope="session")
def dbsession_database(dbsession_url: URL) -> URL:
    """The plugin's test database, migrated with the example's revisions."""
    migrations.upgrade(url=dbsession_url, migrations=MIGRATIONS)
    return dbsession_url
