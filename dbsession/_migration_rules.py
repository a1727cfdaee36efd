"""The rules of ``dbsession lint``: each operation that blocks traffic or rewrites a table
when it runs on an existing table, per backend, why, and the safe recipe.

The table of docs/migrations.md is made from :data:`RULES` (tests/test_migration_safety.py
checks it), with the matching check of strong_migrations (Rails) and squawk (PostgreSQL SQL).
"""

from __future__ import annotations

from dataclasses import dataclass

PG = "postgresql"
MY = "mysql"


@dataclass(frozen=True)
class Rule:
    """One safety rule: ``why`` and ``recipe`` per backend it applies to."""

    id: str
    title: str
    why: dict[str, str]
    recipe: dict[str, str]
    strong_migrations: str = ""
    squawk: str = ""

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self.why)


_COPY = (
    "MariaDB cannot run it INSTANT or INPLACE with LOCK=NONE: it copies the table and writes wait"
)
_EXPAND = (
    "expand/contract: a new column, written by both versions, backfilled in batches "
    "(docs/migrations.md)"
)

RULES: tuple[Rule, ...] = (
    Rule(
        "DBS101",
        "CREATE INDEX without CONCURRENTLY",
        {PG: "holds a SHARE lock for the whole build: every write to the table waits"},
        {
            PG: "op.create_index(..., postgresql_concurrently=True); dbsession runs it outside "
            "the transaction"
        },
        "Adding an index non-concurrently",
        "require-concurrent-index-creation",
    ),
    Rule(
        "DBS102",
        "DROP INDEX without CONCURRENTLY",
        {PG: "takes an ACCESS EXCLUSIVE lock: reads and writes wait behind it"},
        {PG: "op.drop_index(..., postgresql_concurrently=True)"},
        "Removing an index non-concurrently (optional)",
        "require-concurrent-index-deletion",
    ),
    Rule(
        "DBS103",
        "SET NOT NULL without a validated CHECK",
        {PG: "scans the whole table under an ACCESS EXCLUSIVE lock"},
        {
            PG: "CHECK (col IS NOT NULL) NOT VALID, VALIDATE CONSTRAINT, then SET NOT NULL "
            "(docs/migrations.md)"
        },
        "Setting NOT NULL on an existing column",
        "adding-not-nullable-field",
    ),
    Rule(
        "DBS104",
        "ADD COLUMN with a volatile default (or identity, or generated)",
        {PG: "rewrites the table under an ACCESS EXCLUSIVE lock", MY: _COPY},
        {
            PG: "add it with no default or a constant one, then backfill in batches",
            MY: "add it with no default or a constant one, then backfill in batches",
        },
        "Adding a column with a volatile default value",
        "adding-field-with-default",
    ),
    Rule(
        "DBS105",
        "ALTER COLUMN TYPE that rewrites",
        {
            PG: "rewrites the table and its indexes under an ACCESS EXCLUSIVE lock "
            "(widening varchar/numeric, or varchar to text, does not)",
            MY: _COPY + " (widening a VARCHAR within 255 bytes or beyond does not)",
        },
        {PG: _EXPAND, MY: _EXPAND},
        "Changing the type of a column",
        "changing-column-type",
    ),
    Rule(
        "DBS106",
        "FOREIGN KEY without NOT VALID",
        {
            PG: "validates every row under SHARE ROW EXCLUSIVE locks on both tables: writes wait",
            MY: _COPY + " (unless foreign_key_checks=0)",
        },
        {
            PG: "op.create_foreign_key(..., postgresql_not_valid=True), then ALTER TABLE ... "
            "VALIDATE CONSTRAINT in the next revision",
            MY: "create the foreign key with the table, or add it with foreign_key_checks=0 "
            "after checking the rows yourself",
        },
        "Adding a foreign key",
        "adding-foreign-key-constraint",
    ),
    Rule(
        "DBS107",
        "CHECK constraint without NOT VALID",
        {PG: "scans the whole table under an ACCESS EXCLUSIVE lock", MY: _COPY},
        {
            PG: "op.create_check_constraint(..., postgresql_not_valid=True), then VALIDATE "
            "CONSTRAINT in the next revision",
            MY: "enforce it in the code, or add it with the table",
        },
        "Adding a check constraint",
        "constraint-missing-not-valid",
    ),
    Rule(
        "DBS108",
        "ADD PRIMARY KEY / UNIQUE without an existing index",
        {PG: "builds the index while holding an ACCESS EXCLUSIVE lock"},
        {
            PG: "CREATE UNIQUE INDEX CONCURRENTLY, then ALTER TABLE ... ADD CONSTRAINT ... "
            "UNIQUE/PRIMARY KEY USING INDEX"
        },
        "Adding a unique constraint",
        "disallowed-unique-constraint",
    ),
    Rule(
        "DBS109",
        "RENAME COLUMN",
        {
            PG: "the code running now reads the old name: it fails from the commit on",
            MY: "the code running now reads the old name: it fails from the commit on",
        },
        {
            PG: "rename in three deploys: add, write both and backfill, switch reads, drop "
            "(docs/migrations.md)",
            MY: "rename in three deploys: add, write both and backfill, switch reads, drop "
            "(docs/migrations.md)",
        },
        "Renaming a column",
        "renaming-column",
    ),
    Rule(
        "DBS110",
        "DROP COLUMN / TABLE the models still map",
        {
            PG: "code that maps it selects it: every query of the table fails once it is gone",
            MY: "code that maps it selects it: every query of the table fails once it is gone",
        },
        {
            PG: "deploy code that no longer maps it first, then drop it",
            MY: "deploy code that no longer maps it first, then drop it",
        },
        "Removing a column",
        "ban-drop-column / ban-drop-table",
    ),
    Rule(
        "DBS111",
        "RENAME TABLE",
        {
            PG: "the code running now reads the old name: it fails from the commit on",
            MY: "the code running now reads the old name: it fails from the commit on",
        },
        {
            PG: "create a view with the old name, or copy and switch in several deploys",
            MY: "create a view with the old name, or copy and switch in several deploys",
        },
        "Renaming a table",
        "renaming-table",
    ),
    Rule(
        "DBS112",
        "CONCURRENTLY beside other operations in one revision",
        {
            PG: "dbsession commits before a CONCURRENTLY statement: if the revision fails "
            "after it, the next upgrade runs its earlier statements again"
        },
        {PG: "give each CONCURRENTLY operation a revision of its own"},
        "",
        "",
    ),
    Rule(
        "DBS113",
        "raw ALTER TABLE without ALGORITHM and LOCK (MariaDB)",
        {MY: "dbsession cannot tell whether it runs INSTANT/INPLACE with LOCK=NONE"},
        {
            MY: "append ALGORITHM=INPLACE, LOCK=NONE (or ALGORITHM=INSTANT): MariaDB then "
            "refuses an ALTER that would block, instead of blocking"
        },
        "",
        "",
    ),
    Rule(
        "DBS114",
        "VACUUM FULL, CLUSTER, REINDEX without CONCURRENTLY",
        {PG: "rewrites the table or index under an ACCESS EXCLUSIVE lock"},
        {PG: "REINDEX ... CONCURRENTLY; pg_repack instead of VACUUM FULL or CLUSTER"},
        "",
        "",
    ),
    Rule(
        "DBS199",
        "operation not checked",
        {PG: "the check could not read it", MY: "the check could not read it"},
        {
            PG: "review it by hand; allow it once reviewed",
            MY: "review it by hand; allow it once reviewed",
        },
        "",
        "",
    ),
)

BY_ID: dict[str, Rule] = {rule.id: rule for rule in RULES}
