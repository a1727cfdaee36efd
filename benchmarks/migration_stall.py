"""The longest stall a live table's traffic sees while a migration adds a column (issue 26).

Run: ``python benchmarks/migration_stall.py`` (``--help`` for the URLs and sizes).

On each server: 4 threads read a row of ``lockwait_orders`` by primary key every 5 ms;
a transaction reads one row and stays open ``--hold`` seconds (an idle-in-transaction
worker, a report); meanwhile the upgrade adds a nullable column. Side by side:

- ``bare Alembic``: Alembic's generic ``env.py``; the ALTER queues behind the open
  transaction and every read queues behind the ALTER.
- ``dbsession``: ``migrations.upgrade(lock_wait=LockWait(seconds=--lock-wait))``; the ALTER
  gives up after the lock wait, the reads go on, and it tries again until it gets through.

Reported: the longest single read (the stall), reads done, read errors, and how long the
upgrade took. The scenario lives in tests/migration_load.py, shared with the test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from migration_load import drop_all, make_migrations, stall, upgrade_bare  # noqa: E402

from dbsession import migrations  # noqa: E402
from dbsession.migrations import LockWait  # noqa: E402

SERVERS = {
    "PostgreSQL": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "MariaDB": "mysql+pymysql://root@127.0.0.1:3306/test",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--hold", type=float, default=8.0, help="seconds the transaction stays open"
    )
    parser.add_argument("--lock-wait", type=float, default=3.0, help="dbsession's lock wait (s)")
    for name, url in SERVERS.items():
        parser.add_argument(f"--{name.lower()}", default=url, help=f"{name} server database URL")
    args = parser.parse_args()
    policy = LockWait(seconds=args.lock_wait, attempts=100, backoff=0.5, max_backoff=2.0)
    print(f"transaction open {args.hold:g} s; dbsession lock wait {args.lock_wait:g} s\n")
    header = ("server", "runner", "longest read", "reads", "errors", "upgrade")
    print("{:<11} {:<13} {:>13} {:>7} {:>7} {:>9}".format(*header))
    for name in SERVERS:
        server = make_url(getattr(args, name.lower()))
        scratch = f"dbsession_stall_{name.lower()}"
        admin = create_engine(server, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {scratch}"))
            conn.execute(text(f"CREATE DATABASE {scratch}"))
        url = server.set(database=scratch)
        try:
            for label, bare in (("bare Alembic", True), ("dbsession", False)):
                folder = make_migrations(Path(tempfile.mkdtemp()) / "migrations", bare=bare)
                if bare:
                    upgrade_bare(url, folder, "0001")
                else:
                    migrations.upgrade("0001", url=url, migrations=folder)
                outcome = stall(url, folder, lock_wait=policy, hold=args.hold, bare=bare)
                if outcome.error is not None:
                    raise outcome.error
                print(
                    f"{name:<11} {label:<13} {outcome.longest_read:>11.2f} s {outcome.reads:>7} "
                    f"{outcome.read_errors:>7} {outcome.upgrade_seconds:>7.2f} s"
                )
                drop_all(url)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS {scratch}"))
            admin.dispose()


if __name__ == "__main__":
    main()
