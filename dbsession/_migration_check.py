"""``dbsession lint``: read revisions and flag the operations that would block traffic or
rewrite a table on a live database (the rules are in ``_migration_rules``).

How a revision is read: its ``upgrade()`` runs against Alembic's own ``Operations`` on an
offline context of the backend, whose ``invoke`` records each operation object instead of
running it. The objects say what the SQL text would hide or lose (``existing_type``, the
dialect options such as ``postgresql_concurrently``, the source line of the call). SQL
given to ``op.execute`` is parsed on PostgreSQL by pglast (PostgreSQL's own parser,
libpg_query; the ``lint`` extra), and read by its leading words on MySQL/MariaDB.

Not flagged: operations on a table created earlier in the same revision, and any line
(or the statement it belongs to) carrying ``# dbsession: allow DBS101`` (several ids may
follow, separated by commas or spaces).
"""

from __future__ import annotations

import ast
import inspect
import io
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic.operations import Operations
from alembic.operations import ops as alembic_ops
from alembic.runtime.migration import MigrationContext
from alembic.script import Script
from sqlalchemy import MetaData, Numeric, String
from sqlalchemy.sql.elements import ClauseElement, TextClause

from ._migration_rules import BY_ID, PG, Rule

_ALLOW = re.compile(r"#\s*dbsession:\s*allow\s+((?:DBS\d+[\s,]*)+)", re.IGNORECASE)
#: Functions a default may call without being volatile (no table rewrite on PostgreSQL 11+).
STABLE = frozenset(
    {"now", "current_timestamp", "current_date", "current_time", "localtimestamp",
     "localtime", "transaction_timestamp", "statement_timestamp", "current_user",
     "session_user", "user"}
)  # fmt: skip
_CALL = re.compile(r"([A-Za-z_][\w.]*)\s*\(")
_NOT_NULL_CHECK = re.compile(r"^\(*\s*\"?(\w+)\"?\s+IS\s+NOT\s+NULL\s*\)*$", re.IGNORECASE)


@dataclass(frozen=True)
class Finding:
    """One operation a rule flags: where it is, what it does, why it blocks, the recipe."""

    rule: Rule
    backend: str
    revision: str
    path: str
    line: int
    subject: str

    def __str__(self) -> str:
        return (
            f"{self.path}:{self.line}: {self.rule.id} [{self.backend}] {self.subject}: "
            f"{self.rule.why[self.backend]}. Safe: {self.rule.recipe[self.backend]}."
        )


@dataclass
class Step:
    """One recorded operation, reduced to what the rules need."""

    kind: str
    table: str | None
    line: int
    subject: str
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class _History:
    """What the revisions checked so far did, for rules that look back."""

    not_null_checks: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    validated: set[str] = field(default_factory=set)


def check(
    revisions: Iterable[Script], backends: Iterable[str], metadata: MetaData | None
) -> list[Finding]:
    """The findings of every rule on ``revisions`` (oldest first), for each backend."""
    found: list[Finding] = []
    for backend in backends:
        history = _History()
        for script in revisions:
            found.extend(_check_revision(script, backend, metadata, history))
    return found


def _check_revision(
    script: Script, backend: str, metadata: MetaData | None, history: _History
) -> Iterator[Finding]:
    path = script.path
    source = Path(path).read_text()
    allowed = _allowances(source)
    steps = list(_record(script, backend))
    created: set[str] = set()
    concurrent = [s for s in steps if s.facts.get("concurrently")]
    for step in steps:
        if step.kind == "create_table" and step.table:
            created.add(step.table)
            continue
        if step.table in created:
            continue
        for rule_id in _rules_for(step, backend, metadata, history):
            if rule_id in allowed.get(step.line, ()):
                continue
            rule = BY_ID[rule_id]
            yield Finding(rule, backend, script.revision, path, step.line, step.subject)
    if concurrent and len(steps) > len(concurrent) and backend == PG:
        first = concurrent[0]
        if "DBS112" not in allowed.get(first.line, ()):
            yield Finding(
                BY_ID["DBS112"], backend, script.revision, path, first.line, first.subject
            )


def _rules_for(
    step: Step, backend: str, metadata: MetaData | None, history: _History
) -> Iterator[str]:
    facts = step.facts
    pg = backend == PG
    if step.kind == "unread":
        yield "DBS199"
    elif step.kind == "create_index" and pg and not facts.get("concurrently"):
        yield "DBS101"
    elif step.kind == "drop_index" and pg and not facts.get("concurrently"):
        yield "DBS102"
    elif step.kind == "set_not_null" and pg:
        proven = any(
            (table, column) == (step.table, facts["column"]) and name in history.validated
            for name, (table, column) in history.not_null_checks.items()
        )
        if not proven:
            yield "DBS103"
    elif step.kind == "add_column" and facts.get("volatile"):
        yield "DBS104"
    elif step.kind == "alter_type" and _rewrites(facts.get("old"), facts.get("new"), backend):
        yield "DBS105"
    elif step.kind == "add_fk" and not (pg and facts.get("not_valid")):
        yield "DBS106"
    elif step.kind == "add_check":
        if facts.get("column"):
            history.not_null_checks[facts.get("name") or ""] = (step.table, facts["column"])
        if not (pg and facts.get("not_valid")):
            yield "DBS107"
    elif step.kind == "validate":
        history.validated.add(facts.get("name") or "")
    elif step.kind == "add_unique" and pg and not facts.get("using_index"):
        yield "DBS108"
    elif step.kind == "rename_column":
        yield "DBS109"
    elif step.kind in ("drop_column", "drop_table") and _still_mapped(step, metadata):
        yield "DBS110"
    elif step.kind == "rename_table":
        yield "DBS111"
    elif step.kind == "raw_alter" and not pg:
        yield "DBS113"
    elif step.kind == "rewrite" and pg:
        yield "DBS114"


def _still_mapped(step: Step, metadata: MetaData | None) -> bool:
    """True when the models map the dropped column or table (or no models are known)."""
    if metadata is None:
        return True
    table = metadata.tables.get(step.table or "")
    if step.kind == "drop_table":
        return table is not None
    return table is not None and step.facts["column"] in table.c


def _rewrites(old: Any, new: Any, backend: str) -> bool:
    """Whether changing a column's type from ``old`` to ``new`` rewrites the table."""
    if isinstance(old, String) and isinstance(new, String):
        if new.length is None:
            return backend != PG and old.length is not None and old.length * 4 <= 255
        if old.length is None or new.length < old.length:
            return True
        if backend == PG:
            return False
        return (old.length * 4 <= 255) != (new.length * 4 <= 255)  # utf8mb4: 4 bytes a char
    if backend == PG and isinstance(old, Numeric) and isinstance(new, Numeric):
        if type(old) is not type(new) or old.scale != new.scale:
            return True
        return old.precision is not None and (new.precision or 0) < old.precision
    return True


# --- Recording ------------------------------------------------------------------------


def _record(script: Script, backend: str) -> Iterator[Step]:
    """Run the revision's ``upgrade()`` on a recording Operations; yield what it did."""
    context = MigrationContext.configure(
        dialect_name=backend, opts={"as_sql": True, "output_buffer": io.StringIO()}
    )
    recorded: list[tuple[alembic_ops.MigrateOperation, int]] = []

    def invoke(operation: alembic_ops.MigrateOperation) -> Any:
        recorded.append((operation, _caller_line(script.path)))
        if isinstance(operation, alembic_ops.CreateTableOp):
            return operation.to_table()
        return None

    error: Exception | None = None
    with Operations.context(context) as operations:
        operations.invoke = invoke  # type: ignore[method-assign]
        batch_alter_table = operations.batch_alter_table

        @contextmanager
        def batch(*args: Any, **kw: Any) -> Iterator[Any]:
            with batch_alter_table(*args, **kw) as batch_operations:
                batch_operations.invoke = invoke  # type: ignore[method-assign]
                yield batch_operations

        operations.batch_alter_table = batch  # type: ignore[method-assign]
        try:
            script.module.upgrade()
        except Exception as raised:
            error = raised
    for operation, line in recorded:
        yield from _steps(operation, line, backend)
    if error is not None:
        line = _caller_line(script.path, error.__traceback__) or 1
        yield Step("unread", None, line, f"upgrade() raised {type(error).__name__}: {error}")


def _caller_line(path: str, traceback: Any = None) -> int:
    """The line of ``path`` in the current stack (or in ``traceback``), else 0."""
    if traceback is not None:
        line = 0
        for frame, number in _walk(traceback):
            if frame.f_code.co_filename == path:
                line = number
        return line
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_filename == path:
            return int(frame.f_lineno)
        frame = frame.f_back
    return 0


def _walk(traceback: Any) -> Iterator[tuple[Any, int]]:
    while traceback is not None:
        yield traceback.tb_frame, traceback.tb_lineno
        traceback = traceback.tb_next


def _steps(operation: Any, line: int, backend: str) -> Iterator[Step]:
    """The steps of one Alembic operation object."""
    kw: dict[str, Any] = getattr(operation, "kw", None) or {}
    table: str | None = getattr(operation, "table_name", None)
    ops = alembic_ops
    if isinstance(operation, ops.CreateTableOp):
        yield Step("create_table", table, line, f"create_table {table!r}")
    elif isinstance(operation, ops.DropTableOp):
        yield Step("drop_table", table, line, f"drop_table {table!r}")
    elif isinstance(operation, ops.CreateIndexOp):
        subject = f"create_index {operation.index_name!r} on {table!r}"
        facts: dict[str, Any] = {"concurrently": bool(kw.get("postgresql_concurrently"))}
        yield Step("create_index", table, line, subject, facts)
    elif isinstance(operation, ops.DropIndexOp):
        subject = f"drop_index {operation.index_name!r}"
        facts = {"concurrently": bool(kw.get("postgresql_concurrently"))}
        yield Step("drop_index", table, line, subject, facts)
    elif isinstance(operation, ops.AddColumnOp):
        column = operation.column
        subject = f"add_column {table}.{column.name}"
        yield Step("add_column", table, line, subject, {"volatile": _volatile(column)})
    elif isinstance(operation, ops.AlterColumnOp):
        yield from _alter_column_steps(operation, table, line)
    elif isinstance(operation, ops.CreateForeignKeyOp):
        table = operation.source_table
        subject = f"create_foreign_key {operation.constraint_name!r} on {table!r}"
        facts = {"not_valid": bool(kw.get("postgresql_not_valid"))}
        yield Step("add_fk", table, line, subject, facts)
    elif isinstance(operation, ops.CreateCheckConstraintOp):
        subject = f"create_check_constraint {operation.constraint_name!r} on {table!r}"
        condition = _sql_text(operation.condition) or ""
        found = _NOT_NULL_CHECK.match(condition.strip())
        facts = {
            "not_valid": bool(kw.get("postgresql_not_valid")),
            "name": operation.constraint_name,
            "column": found.group(1) if found else None,
        }
        yield Step("add_check", table, line, subject, facts)
    elif isinstance(operation, (ops.CreatePrimaryKeyOp, ops.CreateUniqueConstraintOp)):
        what = "primary key" if isinstance(operation, ops.CreatePrimaryKeyOp) else "unique"
        subject = f"{what} {operation.constraint_name!r} on {table!r}"
        yield Step("add_unique", table, line, subject)
    elif isinstance(operation, ops.DropColumnOp):
        subject = f"drop_column {table}.{operation.column_name}"
        yield Step("drop_column", table, line, subject, {"column": operation.column_name})
    elif isinstance(operation, ops.RenameTableOp):
        subject = f"rename_table {table!r} to {operation.new_table_name!r}"
        yield Step("rename_table", table, line, subject)
    elif isinstance(operation, ops.ExecuteSQLOp):
        sql = _sql_text(operation.sqltext)
        if sql is None:
            return
        if backend == PG:
            from ._migration_sql import pg_steps

            yield from pg_steps(sql, line)
        else:
            yield from _mysql_steps(sql, line)


def _alter_column_steps(operation: Any, table: str | None, line: int) -> Iterator[Step]:
    column = operation.column_name
    where = f"{table}.{column}"
    if operation.modify_nullable is False:
        yield Step("set_not_null", table, line, f"alter_column {where} nullable=False",
                    {"column": column})  # fmt: skip
    if operation.modify_type is not None:
        facts = {"old": operation.existing_type, "new": operation.modify_type}
        yield Step("alter_type", table, line, f"alter_column {where} type_=", facts)
    if operation.modify_name is not None:
        subject = f"alter_column {where} new_column_name={operation.modify_name!r}"
        yield Step("rename_column", table, line, subject)


def _volatile(column: Any) -> bool:
    """A default that PostgreSQL must compute per row, or MariaDB cannot add INSTANT."""
    if column.identity is not None or column.computed is not None:
        return True
    default = column.server_default
    expression = _sql_text(getattr(default, "arg", None)) if default is not None else None
    if not expression:
        return False
    return any(name.lower() not in STABLE for name in _CALL.findall(expression))


def _sql_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, TextClause):
        return value.text
    if isinstance(value, ClauseElement):
        return str(value.compile(compile_kwargs={"literal_binds": True}))
    return None


_COMPOUND = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.With, ast.For, ast.While,
             ast.If, ast.Try)  # fmt: skip
_MYSQL_ALTER = re.compile(r"\s*ALTER\s+(?:ONLINE\s+|IGNORE\s+)*TABLE\s+`?([\w$]+)`?", re.I)


def _mysql_steps(sql: str, line: int) -> Iterator[Step]:
    for statement in filter(None, (part.strip() for part in sql.split(";"))):
        found = _MYSQL_ALTER.match(statement)
        if found is None:
            continue
        upper = statement.upper()
        if "ALGORITHM" in upper and "LOCK" in upper:
            continue
        yield Step("raw_alter", found.group(1), line, f"execute {_clip(statement)!r}")


def _clip(sql: str) -> str:
    flat = " ".join(sql.split())
    return flat if len(flat) <= 80 else flat[:77] + "..."


def _allowances(source: str) -> dict[int, set[str]]:
    """Line -> rule ids allowed there: a comment on any line of a statement (or on a
    comment line just above it) covers every line of that statement."""
    comments: dict[int, set[str]] = {}
    lines = source.splitlines()
    for number, text_line in enumerate(lines, start=1):
        found = _ALLOW.search(text_line)
        if found:
            comments[number] = {i.upper() for i in re.findall(r"DBS\d+", found.group(1), re.I)}
    if not comments:
        return {}
    allowed: dict[int, set[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.stmt) or isinstance(node, _COMPOUND):
            continue
        end = node.end_lineno or node.lineno
        above = node.lineno - 1 if lines[node.lineno - 2].lstrip().startswith("#") else node.lineno
        ids = set().union(*(comments.get(n, set()) for n in range(above, end + 1)))
        if ids:
            for number in range(node.lineno, end + 1):
                allowed.setdefault(number, set()).update(ids)
    return allowed
