"""``python -m examples.fastapi_app [PORT]``: serve the store API on 127.0.0.1 (default port 8000).

The database is DATABASE_URL, else the embedded SQLite file ./dbsession.sqlite3; the
app migrates it to head with Alembic when it starts.
"""

from __future__ import annotations

import sys

import uvicorn

from .app import app

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
