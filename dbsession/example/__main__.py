"""The main job: ``python -m dbsession.example``.

Runs the store's unit of work against DATABASE_URL, else its own SQLite file
``./dbsession-example.sqlite3`` (never an app's ``./dbsession.sqlite3``), then a second
unit of work that fails halfway and is rolled back, and prints what was committed and
what was not.
"""

from __future__ import annotations

import sys

from .store import main

if __name__ == "__main__":
    sys.exit(main())
