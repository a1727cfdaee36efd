"""``dbsession lint`` (issue 26): each rule flags what blocks or rewrites on a live table,
on the backends where it does, and nothing else; allow comments; the docs' rule table."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dbsession import migrations
from dbsession._migration_rules import RULES
from dbsession.cli import main as cli
from dbsession.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[1]
HEAD = """import sqlalchemy as sa
from alembic import op

revision = "{rev}"
down_revision = {down}


def upgrade() -> None:
"""
BASE = """op.create_table(
    "orders",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("note", sa.String(20)),
    sa.Column("amount", sa.Numeric(10, 2)),
)
op.create_index("ix_orders_note", "orders", ["note"])  # the table is new: not flagged
"""


def folder_with(tmp_path: Path, *bodies: str) -> Path:
    """A migrations folder: the base revision, then one revision per body."""
    folder = tmp_path / "migrations"
    (folder / "versions").mkdir(parents=True)
    (folder / "env.py").write_text(migrations.ENV_PY)
    for number, body in enumerate((BASE, *bodies), start=1):
        down = "None" if number == 1 else f'"{number - 1:04d}"'
        source = HEAD.format(rev=f"{number:04d}", down=down) + textwrap.indent(body, "    ")
        (folder / "versions" / f"{number:04d}.py").write_text(source)
    return folder


def flagged(folder: Path, **options: object) -> set[tuple[str, str]]:
    return {(f.rule.id, f.backend) for f in migrations.lint(migrations=folder, **options)}  # type: ignore[arg-type]


PG, MY = "postgresql", "mysql"
CASES = {
    'op.create_index("ix_a", "orders", ["amount"])': {("DBS101", PG)},
    'op.create_index("ix_a", "orders", ["amount"], postgresql_concurrently=True)': set(),
    'op.drop_index("ix_orders_note", table_name="orders")': {("DBS102", PG)},
    'op.drop_index("ix_orders_note", postgresql_concurrently=True)': set(),
    'op.alter_column("orders", "note", nullable=False)': {("DBS103", PG)},
    'op.add_column("orders", sa.Column("t", sa.Uuid, server_default=sa.text("random()")))': {
        ("DBS104", PG),
        ("DBS104", MY),
    },
    'op.add_column("orders", sa.Column("at", sa.DateTime, server_default=sa.text("now()")))': set(),
    'op.add_column("orders", sa.Column("flag", sa.Boolean, server_default=sa.false()))': set(),
    'op.alter_column("orders", "note", existing_type=sa.String(20), type_=sa.String(40))': set(),
    'op.alter_column("orders", "note", existing_type=sa.String(20), type_=sa.String(100))': {
        ("DBS105", MY)
    },
    'op.alter_column("orders", "note", existing_type=sa.String(20), type_=sa.Integer())': {
        ("DBS105", PG),
        ("DBS105", MY),
    },
    'op.alter_column("orders", "amount", existing_type=sa.Numeric(10,2), type_=sa.Numeric(12,2))': {
        ("DBS105", MY)
    },
    'op.create_foreign_key("fk_a", "orders", "customer", ["id"], ["id"])': {
        ("DBS106", PG),
        ("DBS106", MY),
    },
    'op.create_foreign_key("f", "orders", "c", ["id"], ["id"], postgresql_not_valid=True)': {
        ("DBS106", MY)
    },
    'op.create_check_constraint("ck_a", "orders", "amount > 0")': {("DBS107", PG), ("DBS107", MY)},
    'op.create_unique_constraint("uq_a", "orders", ["note"])': {("DBS108", PG)},
    'op.alter_column("orders", "note", new_column_name="memo")': {("DBS109", PG), ("DBS109", MY)},
    'op.drop_column("orders", "note")': {("DBS110", PG), ("DBS110", MY)},
    'op.rename_table("orders", "purchases")': {("DBS111", PG), ("DBS111", MY)},
    'op.execute("CREATE INDEX ix_b ON orders (amount)")': {("DBS101", PG)},
    'op.execute("CREATE INDEX CONCURRENTLY ix_b ON orders (amount)")': set(),
    'op.execute("ALTER TABLE orders ADD COLUMN n serial")': {("DBS104", PG), ("DBS113", MY)},
    'op.execute("ALTER TABLE orders ADD COLUMN n int, ALGORITHM=INSTANT, LOCK=NONE")': {
        ("DBS199", PG)  # not PostgreSQL: pglast cannot parse it, so it says so
    },
    'op.execute("ALTER TABLE orders ADD CONSTRAINT u UNIQUE USING INDEX ix_orders_note")': {
        ("DBS113", MY)
    },
    'op.execute("ALTER TABLE orders ADD FOREIGN KEY (id) REFERENCES c (id) NOT VALID")': {
        ("DBS113", MY)
    },
    'op.execute("REINDEX TABLE orders")': {("DBS114", PG)},
    'op.execute("VACUUM FULL orders")': {("DBS114", PG)},
    'with op.batch_alter_table("orders") as batch:\n    batch.drop_column("note")': {
        ("DBS110", PG),
        ("DBS110", MY),
    },
}


@pytest.mark.parametrize("body", list(CASES))
def test_each_rule_flags_what_blocks_and_only_that(tmp_path: Path, body: str) -> None:
    assert flagged(folder_with(tmp_path, body)) == CASES[body]


def test_set_not_null_after_a_validated_check_is_not_flagged(tmp_path: Path) -> None:
    folder = folder_with(
        tmp_path,
        'op.create_check_constraint("ck_note", "orders", "note IS NOT NULL", '
        "postgresql_not_valid=True)\n",
        'op.execute("ALTER TABLE orders VALIDATE CONSTRAINT ck_note")\n'
        'op.alter_column("orders", "note", nullable=False)\n',
    )
    assert flagged(folder, backends=[PG]) == set()
    unvalidated = folder_with(
        tmp_path / "b",
        'op.create_check_constraint("ck_note", "orders", "note IS NOT NULL", '
        "postgresql_not_valid=True)\n"
        'op.alter_column("orders", "note", nullable=False)\n',
    )
    assert flagged(unvalidated, backends=[PG]) == {("DBS103", PG)}


def test_allow_comments_cover_their_statement_and_only_the_rules_named(tmp_path: Path) -> None:
    folder = folder_with(
        tmp_path,
        'op.create_index("ix_a", "orders", ["amount"])  # dbsession: allow DBS101\n'
        "op.create_index(  # dbsession: allow DBS102\n"
        '    "ix_b", "orders", ["amount"]\n'
        ")\n"
        "# dbsession: allow DBS109, DBS101\n"
        'op.alter_column("orders", "note", new_column_name="memo")\n',
    )
    findings = migrations.lint(migrations=folder)
    # The second index: its comment allows another rule.
    assert [(f.rule.id, f.backend, f.line) for f in findings] == [("DBS101", PG, 10)]


def test_drop_column_is_flagged_only_while_the_models_map_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "lint_models.py"
    models.write_text(
        "import sqlalchemy as sa\n"
        "metadata = sa.MetaData()\n"
        'sa.Table("orders", metadata, sa.Column("id", sa.Integer, primary_key=True), '
        'sa.Column("amount", sa.Numeric(10, 2)))\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = folder_with(tmp_path, 'op.drop_column("orders", "note")\n')
    assert flagged(folder, metadata="lint_models:metadata") == set()
    mapped = folder_with(tmp_path / "b", 'op.drop_column("orders", "amount")\n')
    assert flagged(mapped, metadata="lint_models:metadata") == {("DBS110", PG), ("DBS110", MY)}


def test_a_concurrent_index_beside_other_operations_is_flagged(tmp_path: Path) -> None:
    folder = folder_with(
        tmp_path,
        'op.create_index("ix_a", "orders", ["amount"], postgresql_concurrently=True)\n'
        'op.add_column("orders", sa.Column("n", sa.Integer))\n',
    )
    assert flagged(folder, backends=[PG]) == {("DBS112", PG)}


def test_an_upgrade_that_cannot_run_offline_is_reported_not_passed(tmp_path: Path) -> None:
    folder = folder_with(
        tmp_path, 'op.get_bind().execute(sa.text("SELECT id FROM orders")).all()\n'
    )
    findings = migrations.lint(migrations=folder, backends=[PG])
    assert [(f.rule.id, f.line) for f in findings] == [("DBS199", 9)]
    assert "AttributeError" in findings[0].subject


def test_since_checks_only_later_revisions(tmp_path: Path) -> None:
    folder = folder_with(
        tmp_path,
        'op.create_index("ix_a", "orders", ["amount"])\n',
        'op.create_index("ix_b", "orders", ["note"], postgresql_concurrently=True)\n',
    )
    assert flagged(folder, backends=[PG]) == {("DBS101", PG)}
    assert flagged(folder, backends=[PG], since="0002") == set()


def test_pending_checks_only_what_the_database_has_not_run(tmp_path: Path) -> None:
    folder = folder_with(
        tmp_path,
        'op.create_index("ix_a", "orders", ["amount"])\n',
        'op.drop_index("ix_orders_note", table_name="orders")\n',
    )
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    migrations.upgrade("0002", url=url, migrations=folder)
    assert flagged(folder, pending=True, url=url, backends=[PG]) == {("DBS102", PG)}
    with pytest.raises(ConfigurationError, match="Unknown backend"):
        migrations.lint(migrations=folder, pending=True, url=url)  # SQLite: no rules


def test_cli_lint_prints_each_finding_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = folder_with(tmp_path, 'op.create_index("ix_a", "orders", ["amount"])\n')
    assert cli(["--migrations", str(folder), "lint", "--backend", "postgresql"]) == 1
    out, err = capsys.readouterr()
    assert "0002.py:9: DBS101 [postgresql] create_index 'ix_a' on 'orders'" in out
    assert "postgresql_concurrently=True" in out
    assert "1 operation(s) would block traffic" in err
    clean = folder_with(tmp_path / "b")
    assert cli(["--migrations", str(clean), "lint"]) == 0
    assert "no operation that would block" in capsys.readouterr().out


def test_the_template_migrations_pass_the_check() -> None:
    assert migrations.lint(migrations=ROOT / "migrations") == []


def rules_table() -> str:
    """The rule table of docs/migrations.md, made from the rules."""
    rows = [
        "| rule | what | PostgreSQL | MariaDB | strong_migrations | squawk |",
        "|---|---|---|---|---|---|",
    ]
    for rule in RULES:
        pg = "yes" if PG in rule.why else ""
        my = "yes" if MY in rule.why else ""
        sm = rule.strong_migrations or "no"
        sq = f"`{rule.squawk}`" if rule.squawk else "no"
        rows.append(f"| {rule.id} | {rule.title} | {pg} | {my} | {sm} | {sq} |")
    return "\n".join(rows) + "\n"


def test_the_docs_rule_table_is_the_rules() -> None:
    page = (ROOT / "docs" / "migrations.md").read_text()
    assert rules_table() in page, "regenerate the table: python -c 'from test_migration_safety ...'"
