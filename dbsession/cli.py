"""The ``dbsession`` console script (also ``python -m dbsession``): Alembic commands with
dbsession's URL resolution, for apps that have no copy of the template's ``alembic.ini``.

Every failure is one line on stderr and exit status 1 (``--traceback`` shows the whole
story); no line ever holds a password. An empty ``--url`` is refused by every command,
read-only commands never create a database, and ``downgrade`` and ``stamp`` say which
database they act on before acting. docs/cli.md describes each command.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import alembic
from alembic import command
from alembic.config import Config

from . import migrations
from ._config import ENV_VAR, mask_url, resolve_url, scrub
from ._errors import (
    DbSessionError,
    InvalidURLError,
    MigrationError,
    MigrationsNotFoundError,
    SchemaNotAtHeadError,
)

#: Commands that only read: Alembic's progress lines are not shown.
_READ_ONLY = frozenset({"current", "check", "heads", "history", "show", "lint"})
#: Alembic's lines that say nothing to an operator.
_CHATTER = ("Context impl ", "Will assume ")


def _not_chatter(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_CHATTER)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error never echoes a URL's password."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {mask_url(message)}\n")


def _global_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    """The options every command takes, before or after the command's name."""
    parser.add_argument(
        "--url", default=default, help=f"database URL (default: {ENV_VAR}, else SQLite file)"
    )
    parser.add_argument(
        "--migrations",
        default=default,
        help="migrations folder or alembic.ini (default: DBSESSION_MIGRATIONS, "
        "./alembic.ini, ./migrations)",
    )
    parser.add_argument(
        "--metadata",
        default=default,
        help="import path of the models' MetaData for autogenerate and check, "
        "e.g. myapp.models:Base.metadata (default: DBSESSION_METADATA or alembic.ini)",
    )
    parser.add_argument(
        "--traceback",
        action="store_true",
        default=False if default is None else default,
        help="on failure, print the full traceback instead of one line",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dbsession",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # --version on one line
        description="Run Alembic migrations with dbsession's configuration "
        f"(URL: --url, else {ENV_VAR}, else ./dbsession.sqlite3).",
    )
    _global_options(parser, default=None)
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _global_options(sub, default=argparse.SUPPRESS)
        return sub

    up = add("upgrade", "upgrade to a revision (default: head)")
    up.add_argument("revision", nargs="?", default="head")
    up.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    _lock_wait_options(up)
    up.add_argument(
        "--rehearse",
        action="store_true",
        help="PostgreSQL: run the pending revisions on a scratch copy and report each "
        "statement's locks, time and table rewrites (the database is not changed)",
    )
    down = add("downgrade", "downgrade to a revision ('base': all); names the database first")
    down.add_argument("revision")
    down.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    _lock_wait_options(down)
    stamp = add("stamp", "record a revision in the database without running migrations")
    stamp.add_argument("revision")
    stamp.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    add("current", "show the database's revision (never creates a database)")
    add("heads", "show the newest revision(s)")
    add("history", "list the revisions")
    show = add("show", "show one revision (default: head)")
    show.add_argument("revision", nargs="?", default="head")
    check = add("check", "fail unless the database is at head and the models match the migrations")
    check.add_argument(
        "--revision-only",
        action="store_true",
        help="check only that the database is at head (no metadata to compare)",
    )
    _lint_parser(add("lint", "flag operations that would block traffic or rewrite a table"))
    rev = add("revision", "create a new revision")
    rev.add_argument("-m", "--message", required=True)
    rev.add_argument("--autogenerate", action="store_true", help="diff the models and database")
    merge = add("merge", "merge several heads into one revision")
    merge.add_argument("revisions", nargs="*", default=["heads"], help="default: heads")
    merge.add_argument("-m", "--message", default="merge heads")
    init = add("init", "create a migrations folder wired to dbsession")
    init.add_argument("directory", nargs="?", default="migrations")
    return parser


def _version() -> str:
    import sqlalchemy

    from ._version import __version__

    return (
        f"dbsession {__version__} (SQLAlchemy {sqlalchemy.__version__}, "
        f"Alembic {alembic.__version__}; from {Path(__file__).parent})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (1 with a one-line error on failure)."""
    args = _parser().parse_args(argv)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as python -m and Alembic's prepend_sys_path do
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_not_chatter)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    logging.getLogger("dbsession").setLevel(logging.WARNING)
    migrations.target_logger.setLevel(logging.INFO)  # "upgrading <the database> to head"
    if args.command in _READ_ONLY:
        logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
        logging.getLogger("alembic.autogenerate").setLevel(logging.WARNING)  # check: one line
    try:
        _dispatch(args)
    except Exception as error:
        if args.traceback:
            print(_masked(args, "".join(traceback.format_exception(error))), file=sys.stderr)
        else:
            print(f"dbsession {args.command}: {_one_line(args, error)}", file=sys.stderr)
        return 1
    return 0


def _one_line(args: argparse.Namespace, error: Exception) -> str:
    if isinstance(error, DbSessionError):  # masked already; the URL's secrets removed anyway
        return _masked(args, str(error), mask=False)
    first = (str(error).strip().splitlines() or [""])[0]
    return _masked(
        args, f"{type(error).__name__}: {first} (run with --traceback for the full story)"
    )


def _masked(args: argparse.Namespace, text: str, *, mask: bool = True) -> str:
    """``text`` with URLs masked line by line, and without the secrets of the URL in use
    (if it can be resolved at all)."""
    if mask:
        text = "\n".join(mask_url(line) for line in text.split("\n"))
    try:
        return scrub(text, resolve_url(args.url)[0])
    except DbSessionError:
        return text


def _dispatch(args: argparse.Namespace) -> None:
    if args.url is not None and not args.url.strip():
        raise InvalidURLError(
            "--url is empty (an unset variable?): refusing to fall back to "
            f"{ENV_VAR} or the SQLite default. Name the database."
        )
    if args.command == "init":
        _init(Path(args.directory))
        return
    handler = _HANDLERS[args.command]
    handler(args)


def _lock_wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lock-wait",
        type=float,
        metavar="SECONDS",
        help="how long each statement waits for its lock before the migration gives way and "
        "tries again (default: DBSESSION_MIGRATION_LOCK_WAIT, else 3; 0: no limit)",
    )
    parser.add_argument(
        "--lock-attempts",
        type=int,
        metavar="N",
        help="tries before giving up, naming the blocking session (default: 5)",
    )


def _lock_wait(args: argparse.Namespace) -> migrations.LockWait:
    policy = migrations.lock_wait_of(args.lock_wait, source="--lock-wait")
    if args.lock_attempts is None:
        return policy
    return dataclasses.replace(policy, attempts=args.lock_attempts)


def _upgrade(args: argparse.Namespace) -> None:
    if args.rehearse:
        statements = migrations.rehearse(url=args.url, migrations=args.migrations)
        for statement in statements:
            print(statement)
        print(f"{len(statements)} statement(s) rehearsed on a scratch copy; nothing was changed")
        return
    migrations.upgrade(
        args.revision,
        url=args.url,
        migrations=args.migrations,
        sql=args.sql,
        lock_wait=_lock_wait(args),
    )


def _downgrade(args: argparse.Namespace) -> None:
    # migrations.downgrade names the database (a WARNING log line) before acting.
    migrations.downgrade(
        args.revision,
        url=args.url,
        migrations=args.migrations,
        sql=args.sql,
        lock_wait=_lock_wait(args),
    )


def _stamp(args: argparse.Namespace) -> None:
    config = _config(args)
    migrations.announce(config, logging.WARNING, f"stamping {{target}} as {args.revision}")
    migrations.run_command(command.stamp, config, args.revision, sql=args.sql)


def _current(args: argparse.Namespace) -> None:
    try:
        config = _config(args)
    except MigrationsNotFoundError:  # no env.py to ask: the URL alone says which database
        heads, target = migrations.applied_heads(args.url), migrations.describe_target(args.url)
    else:
        heads, target = migrations.read_heads(config), str(migrations.used_target(config))
    print(f"dbsession: reading {target}", file=sys.stderr)
    if heads is None:
        print(f"<base> (no database: {target} does not exist; nothing was created)")
    elif len(heads) > 1:
        print(f"{', '.join(sorted(heads))} ({len(heads)} heads applied: 'dbsession upgrade')")
    else:
        print(heads[0] if heads else "<base> (no migration applied)")


def _check(args: argparse.Namespace) -> None:
    config = _config(args)
    newest = migrations.head(migrations=args.migrations)
    heads = migrations.read_heads(config)
    at = migrations.one_head(heads or (), f"The database {migrations.used_target(config)}")
    if at != newest:
        raise SchemaNotAtHeadError(at, newest)
    if args.revision_only:
        print("the database is at head (models not compared: --revision-only)")
        return
    config = _config(args)
    if not migrations.metadata_configured(config):
        raise MigrationError(
            "the database is at head, but the models were NOT compared: no metadata is "
            "configured. Pass --metadata myapp.models:Base.metadata (or set "
            "DBSESSION_METADATA), or pass --revision-only to check the revision alone."
        )
    migrations.run_command(command.check, config)
    print("the database is at head and matches the models")


def _lint_parser(lint: argparse.ArgumentParser) -> None:
    lint.add_argument("--since", metavar="REV", help="check only the revisions after REV")
    lint.add_argument(
        "--pending",
        action="store_true",
        help="check only the revisions the database (--url) has not run yet",
    )
    lint.add_argument(
        "--backend",
        action="append",
        choices=["postgresql", "mysql"],
        help="the backend whose locks count (repeatable; default: both, or the database's "
        "with --pending)",
    )


def _lint(args: argparse.Namespace) -> None:
    findings = migrations.lint(
        migrations=args.migrations,
        metadata=args.metadata,
        backends=args.backend,
        since=args.since,
        pending=args.pending,
        url=args.url,
    )
    for finding in findings:
        print(finding)
    if findings:
        raise MigrationError(
            f"{len(findings)} operation(s) would block traffic or rewrite a table (above). "
            "Follow the recipe, or mark a deliberate one '# dbsession: allow <rule id>'."
        )
    print("no operation that would block traffic or rewrite a table")


def _revision(args: argparse.Namespace) -> None:
    config = _config(args)
    if args.autogenerate and not migrations.metadata_configured(config):
        raise MigrationError(
            "revision --autogenerate needs the models' metadata: pass --metadata "
            "myapp.models:Base.metadata or set DBSESSION_METADATA."
        )
    migrations.run_command(
        command.revision, config, message=args.message, autogenerate=args.autogenerate
    )


def _alembic(fn: Callable[..., Any], *names: str) -> Callable[[argparse.Namespace], None]:
    """A handler running ``fn(config, *[args.name for name in names])``."""

    def handler(args: argparse.Namespace) -> None:
        migrations.run_command(fn, _config(args), *(getattr(args, name) for name in names))

    return handler


def _merge(args: argparse.Namespace) -> None:
    migrations.run_command(command.merge, _config(args), args.revisions, message=args.message)


_HANDLERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "upgrade": _upgrade,
    "downgrade": _downgrade,
    "stamp": _stamp,
    "current": _current,
    "check": _check,
    "lint": _lint,
    "revision": _revision,
    "merge": _merge,
    "heads": _alembic(command.heads),
    "history": _alembic(command.history),
    "show": _alembic(command.show, "revision"),
}


def _config(args: argparse.Namespace) -> Config:
    return migrations.make_config(args.migrations, url=args.url, metadata=args.metadata)


def _init(directory: Path) -> None:
    if directory.exists():
        raise MigrationError(f"{directory} already exists; choose another folder.")
    try:
        (directory / "versions").mkdir(parents=True)
        template = Path(alembic.__file__).parent / "templates" / "generic" / "script.py.mako"
        shutil.copy(template, directory / "script.py.mako")
        (directory / "env.py").write_text(migrations.ENV_PY)
    except OSError as error:
        raise MigrationError(
            f"Cannot create the migrations folder {directory}: {error.strerror or error}. "
            "Choose a folder you can write to."
        ) from None
    where = "" if directory == Path("migrations") else f" --migrations {directory}"
    print(
        f"created {directory}: set DBSESSION_METADATA=myapp.models:Base.metadata, then run "
        f"'dbsession{where} revision --autogenerate -m first' and 'dbsession{where} upgrade'"
    )
