"""``python -m examples.fastapi_app [PORT] [--async]``: serve the store API on 127.0.0.1.

The default port is 8000. ``--async`` serves ``async_app`` (async def path operations
over dbsession.asyncio; needs ``pip install 'sqlalchemy-dbsession[fastapi,async]'``)
instead of ``app``.

The database is DATABASE_URL, else the embedded SQLite file ./dbsession.sqlite3; the
app migrates it to head with Alembic when it starts.
"""

from __future__ import annotations

import sys

import uvicorn

if __name__ == "__main__":
    args = [arg for arg in sys.argv[1:] if arg != "--async"]
    module = "async_app" if "--async" in sys.argv[1:] else "app"
    port = int(args[0]) if args else 8000
    uvicorn.run(f"examples.fastapi_app.{module}:app", host="127.0.0.1", port=port)
