"""The ``dbsession`` console script (also ``python -m dbsession``): Alembic commands with
dbsession's URL resolution, for apps that have no copy of the template's ``alembic.ini``."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import alembic
from alembic import command
from alembic.config import Config

from . import migrations
from ._errors import DbSessionError, MigrationError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbsession",
        description="Run Alembic migrations with dbsession's configuration "
        "(URL: --url, else DATABASE_URL, else ./dbsession.sqlite3).",
    )
    parser.add_argument("--url", help="database URL (default: DATABASE_URL, else SQLite file)")
    parser.add_argument(
        "--migrations",
        help="migrations folder or alembic.ini (default: DBSESSION_MIGRATIONS, "
        "./alembic.ini, ./migrations)",
    )
    parser.add_argument(
        "--metadata",
        help="import path of the models' MetaData for autogenerate, "
        "e.g. myapp.models:Base.metadata (default: DBSESSION_METADATA or alembic.ini)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("upgrade", help="upgrade to a revision (default: head)")
    up.add_argument("revision", nargs="?", default="head")
    up.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    down = commands.add_parser("downgrade", help="downgrade to a revision ('base': all)")
    down.add_argument("revision")
    down.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    commands.add_parser("current", help="show the database's revision")
    commands.add_parser("heads", help="show the newest revision(s)")
    commands.add_parser("history", help="list the revisions")
    commands.add_parser(
        "check", help="fail unless the database is at head and the models match the migrations"
    )
    rev = commands.add_parser("revision", help="create a new revision")
    rev.add_argument("-m", "--message", required=True)
    rev.add_argument("--autogenerate", action="store_true", help="diff the models and database")
    init = commands.add_parser("init", help="create a migrations folder wired to dbsession")
    init.add_argument("directory", nargs="?", default="migrations")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (1 with a one-line error on failure)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    logging.getLogger("dbsession").setLevel(logging.WARNING)
    try:
        _dispatch(args)
    except DbSessionError as error:
        print(f"dbsession {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "init":
        _init(Path(args.directory))
        return
    if args.command == "upgrade":
        migrations.upgrade(args.revision, url=args.url, migrations=args.migrations, sql=args.sql)
    elif args.command == "downgrade":
        migrations.downgrade(args.revision, url=args.url, migrations=args.migrations, sql=args.sql)
    elif args.command == "current":
        print(migrations.current(url=args.url) or "<base> (no migration applied)")
    elif args.command == "check":
        migrations.require_head(url=args.url, migrations=args.migrations)
        config = _config(args)
        if migrations.metadata_configured(config):
            migrations.run_command(command.check, config)
        print("the database is at head and matches the models")
    else:
        config = _config(args)
        if args.command == "heads":
            migrations.run_command(command.heads, config)
        elif args.command == "history":
            migrations.run_command(command.history, config)
        else:
            if args.autogenerate and not migrations.metadata_configured(config):
                raise MigrationError(
                    "revision --autogenerate needs the models' metadata: pass --metadata "
                    "myapp.models:Base.metadata, set DBSESSION_METADATA, or set "
                    "dbsession_metadata in alembic.ini."
                )
            migrations.run_command(
                command.revision, config, message=args.message, autogenerate=args.autogenerate
            )


def _config(args: argparse.Namespace) -> Config:
    return migrations.make_config(args.migrations, url=args.url, metadata=args.metadata)


def _init(directory: Path) -> None:
    if directory.exists():
        raise MigrationError(f"{directory} already exists; choose another folder.")
    (directory / "versions").mkdir(parents=True)
    template = Path(alembic.__file__).parent / "templates" / "generic" / "script.py.mako"
    shutil.copy(template, directory / "script.py.mako")
    (directory / "env.py").write_text(migrations.ENV_PY)
    print(
        f"created {directory}: set DBSESSION_METADATA=myapp.models:Base.metadata, then run "
        f"'dbsession --migrations {directory} revision --autogenerate -m first'"
    )
