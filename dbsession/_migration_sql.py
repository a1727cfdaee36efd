"""SQL given to ``op.execute`` on PostgreSQL, read by pglast (PostgreSQL's own parser,
libpg_query, from the ``lint`` extra) into the steps ``dbsession lint`` checks.

Without pglast, or for SQL it cannot parse, the statement is reported as not checked
(rule DBS199) rather than passed: a linter that skips what it cannot read says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ._migration_check import STABLE, Step


def pg_steps(sql: str, line: int) -> Iterator[Step]:
    """The steps of the PostgreSQL statements in ``sql``, all on source line ``line``."""
    try:
        from pglast import parse_sql
        from pglast.parser import ParseError
    except ImportError:
        yield Step("unread", None, line, "op.execute SQL (install dbsession[lint] to check it)")
        return
    try:
        statements = parse_sql(sql)
    except ParseError as error:
        yield Step("unread", None, line, f"op.execute SQL pglast cannot parse ({error})")
        return
    for raw in statements:
        yield from _statement_steps(raw.stmt, line, _clip(sql, raw))


def _clip(sql: str, raw: Any) -> str:
    start = raw.stmt_location or 0
    length = raw.stmt_len or len(sql) - start
    flat = " ".join(sql[start : start + length].split())
    return f"execute {flat if len(flat) <= 80 else flat[:77] + '...'!r}"


def _statement_steps(node: Any, line: int, subject: str) -> Iterator[Step]:
    kind = type(node).__name__
    if kind == "CreateStmt":
        yield Step("create_table", node.relation.relname, line, subject)
    elif kind == "IndexStmt":
        facts = {"concurrently": bool(node.concurrent)}
        yield Step("create_index", node.relation.relname, line, subject, facts)
    elif kind == "DropStmt":
        removed = node.removeType.name
        if removed == "OBJECT_INDEX":
            facts = {"concurrently": bool(node.concurrent)}
            yield Step("drop_index", None, line, subject, facts)
        elif removed == "OBJECT_TABLE":
            for name in node.objects:
                yield Step("drop_table", name[-1].sval, line, subject)
    elif kind == "RenameStmt":
        renamed = node.renameType.name
        table = node.relation.relname if node.relation else None
        if renamed == "OBJECT_COLUMN":
            yield Step("rename_column", table, line, subject)
        elif renamed == "OBJECT_TABLE":
            yield Step("rename_table", table, line, subject)
    elif kind == "AlterTableStmt":
        for command in node.cmds or ():
            yield from _alter_steps(node.relation.relname, command, line, subject)
    elif kind == "ReindexStmt":
        options = {option.defname for option in node.params or ()}
        if "concurrently" not in options:
            yield Step("rewrite", None, line, subject)
    elif kind == "VacuumStmt":
        if any(option.defname == "full" for option in node.options or ()):
            yield Step("rewrite", None, line, subject)
    elif kind == "ClusterStmt":
        yield Step("rewrite", None, line, subject)


def _alter_steps(table: str, command: Any, line: int, subject: str) -> Iterator[Step]:
    what = command.subtype.name
    definition = command.def_
    if what == "AT_SetNotNull":
        yield Step("set_not_null", table, line, subject, {"column": command.name})
    elif what == "AT_AlterColumnType":
        yield Step("alter_type", table, line, subject, {"old": None, "new": None})
    elif what == "AT_DropColumn":
        yield Step("drop_column", table, line, subject, {"column": command.name})
    elif what == "AT_ValidateConstraint":
        yield Step("validate", table, line, subject, {"name": command.name})
    elif what == "AT_AddColumn":
        yield Step("add_column", table, line, subject, {"volatile": _volatile(definition)})
    elif what == "AT_AddConstraint":
        yield from _constraint_steps(table, definition, line, subject)


def _constraint_steps(table: str, constraint: Any, line: int, subject: str) -> Iterator[Step]:
    kind = constraint.contype.name
    if kind == "CONSTR_FOREIGN":
        yield Step("add_fk", table, line, subject, {"not_valid": bool(constraint.skip_validation)})
    elif kind == "CONSTR_CHECK":
        expression = constraint.raw_expr
        column = None
        if (
            type(expression).__name__ == "NullTest"
            and expression.nulltesttype.name == "IS_NOT_NULL"
        ):
            fields = getattr(expression.arg, "fields", None) or ()
            column = getattr(fields[-1], "sval", None) if fields else None
        facts = {
            "not_valid": bool(constraint.skip_validation),
            "name": constraint.conname,
            "column": column,
        }
        yield Step("add_check", table, line, subject, facts)
    elif kind in ("CONSTR_PRIMARY", "CONSTR_UNIQUE"):
        yield Step("add_unique", table, line, subject, {"using_index": bool(constraint.indexname)})


def _volatile(column: Any) -> bool:
    """Identity, generated, serial, or a default calling a function that is not stable."""
    type_names = [n.sval for n in (column.typeName.names if column.typeName else ())]
    if type_names and type_names[-1] in ("serial", "bigserial", "smallserial"):
        return True
    for constraint in column.constraints or ():
        kind = constraint.contype.name
        if kind in ("CONSTR_IDENTITY", "CONSTR_GENERATED"):
            return True
        if kind == "CONSTR_DEFAULT" and any(
            name.lower() not in STABLE for name in _called(constraint.raw_expr)
        ):
            return True
    return False


def _called(node: Any) -> Iterator[str]:
    """Names of the functions an expression tree calls."""
    from pglast.visitors import Visitor

    class Calls(Visitor):
        def __init__(self) -> None:
            self.names: list[str] = []

        def visit_FuncCall(self, ancestors: Any, node: Any) -> None:  # noqa: N802
            self.names.append(node.funcname[-1].sval)

    calls = Calls()
    calls(node)
    yield from calls.names
