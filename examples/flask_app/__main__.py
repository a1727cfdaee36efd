"""``python -m examples.flask_app [PORT]``: serve the store API on 127.0.0.1 (default port 5000).

The database is DATABASE_URL, else the embedded SQLite file ./dbsession.sqlite3;
``create_app()`` migrates it to head with Alembic first.
"""

from __future__ import annotations

import sys

from .app import create_app

if __name__ == "__main__":
    create_app().run(host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
