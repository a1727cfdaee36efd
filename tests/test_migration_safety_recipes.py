"""The expand/contract recipes of docs/migrations.md, run step by step on PostgreSQL and
MariaDB while the previous version of the code keeps reading and writing (issue 26): the
old code sees no error, and every value it wrote is where the newest code reads it."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import blocks
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from dbsession import migrations

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "migrations.md"

pytestmark = [pytest.mark.slow, pytest.mark.backends("postgresql", "mysql")]


@dataclass(frozen=True)
class Code:
    """A version of the app: per value it keeps, the columns it writes it to (all of them)
    and the column it reads it from."""

    writes: dict[str, tuple[str, ...]]
    reads: dict[str, str]


TEXT, QTY, AMOUNT = "text", "qty", "amount"
V0 = Code({TEXT: ("note",), QTY: ("qty",), AMOUNT: ("amount",)}, {TEXT: "note", QTY: "qty"})
# Each step: the revision to migrate to, the code running meanwhile, the code deployed after.
STEPS: list[tuple[str, Code, Code]] = []


def _steps() -> list[tuple[str, Code, Code]]:
    both_text = {**V0.writes, TEXT: ("note", "memo")}
    v1 = Code(both_text, V0.reads)  # writes note and memo, reads note
    v2 = Code(both_text, {**V0.reads, TEXT: "memo"})
    v3 = Code({**V0.writes, TEXT: ("memo",)}, {**V0.reads, TEXT: "memo"})
    v4 = Code({**v3.writes, QTY: ("qty", "quantity")}, v3.reads)
    v5 = Code(v4.writes, {**v3.reads, QTY: "quantity"})
    v6 = Code({**v3.writes, QTY: ("quantity",)}, v5.reads)
    v7 = Code(v6.writes, {**v6.reads, AMOUNT: "amount"})
    return [
        ("0002", V0, v1),  # add memo while the old code runs
        ("0003", v1, v2),  # backfill while the code writes both
        ("0004", v3, v3),  # drop note after the deploy that stopped using it
        ("0005", v3, v4),
        ("0006", v4, v5),
        ("0007", v6, v6),
        ("0008", v6, v6),  # drop legacy: no version ever used it
        ("0009", v7, v7),  # the code writes amount always (it always did)
        ("0010", v7, v7),
        ("0011", v7, v7),
        ("0012", v7, v7),
    ]


@dataclass
class App:
    """Threads running one version of the code: insert rows, update them, read them back."""

    engine: Engine
    code: Code
    written: dict[int, dict[str, int]]
    ids: Iterator[int]
    owned: dict[int, list[int]]  # worker -> its rows (no two workers write one row)
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _values(self) -> dict[str, int]:
        return {name: random.randrange(1, 10**6) for name in self.code.writes}

    def _columns(self, values: dict[str, int]) -> dict[str, object]:
        out: dict[str, object] = {}
        for name, value in values.items():
            for column in self.code.writes[name]:
                out[column] = f"v{value}" if name == TEXT else value
        return out

    def _once(self, worker: int) -> None:
        rows = self.owned.setdefault(worker, [])
        mine = random.choice(rows) if rows and random.random() < 0.6 else None
        values = self._values()
        columns = self._columns(values)
        with self.engine.begin() as conn:
            if mine is None:
                with self.lock:
                    row = next(self.ids)
                rows.append(row)
                names = ", ".join(["id", *columns])
                marks = ", ".join(f":{c}" for c in ["id", *columns])
                conn.execute(
                    text(f"INSERT INTO invoices ({names}) VALUES ({marks})"), {"id": row, **columns}
                )
            else:
                row = mine
                sets = ", ".join(f"{c} = :{c}" for c in columns)
                conn.execute(
                    text(f"UPDATE invoices SET {sets} WHERE id = :id"), {"id": row, **columns}
                )
        with self.lock:
            self.written.setdefault(row, {}).update(values)
            expected = dict(self.written[row])
        reads = ", ".join(f"{column} AS {name}" for name, column in self.code.reads.items())
        with self.engine.connect() as conn:
            got = conn.execute(
                text(f"SELECT {reads} FROM invoices WHERE id = :id"), {"id": row}
            ).one()
        for name in self.code.reads:
            value = expected.get(name)
            seen = getattr(got, name)
            if value is not None and seen != (f"v{value}" if name == TEXT else value):
                raise AssertionError(f"row {row}: read {name}={seen!r}, wrote {value!r}")

    def run(self, worker: int) -> None:
        while not self.stop.is_set():
            try:
                self._once(worker)
            except Exception as error:
                self.errors.append(error)
            time.sleep(0.002)


@pytest.fixture
def recipes(backend_url: URL, tmp_path: Path) -> Iterator[Path]:
    """The migrations folder of the page's recipe revisions; the table dropped after."""
    folder = tmp_path / "recipes"
    (folder / "versions").mkdir(parents=True)
    (folder / "env.py").write_text(migrations.ENV_PY)
    for block in blocks(PAGE.read_text()):
        if block.marker == "file" and block.argument.startswith("recipes/versions/"):
            (tmp_path / block.argument).write_text(block.code)
    yield folder
    engine = create_engine(backend_url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS invoices"))
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()


def test_each_recipe_keeps_the_running_code_working(backend_url: URL, recipes: Path) -> None:
    migrations.upgrade("0001", url=backend_url, migrations=recipes)
    engine = create_engine(backend_url, pool_size=4)
    written: dict[int, dict[str, int]] = {}
    ids = itertools.count(1)
    # Rows from before: the old code fills the table first (some with no amount).
    owned: dict[int, list[int]] = {}
    seed = App(engine, V0, written, ids, owned)
    for _ in range(200):
        seed._once(0)
    with engine.begin() as conn:
        conn.execute(text("UPDATE invoices SET amount = NULL WHERE id % 3 = 0"))
    for values in (v for row, v in written.items() if row % 3 == 0):
        values.pop(AMOUNT)
    try:
        for revision, running, deployed in _steps():
            app = App(engine, running, written, ids, owned)
            workers = [threading.Thread(target=app.run, args=(k,)) for k in range(2)]
            for worker in workers:
                worker.start()
            time.sleep(0.2)
            try:
                migrations.upgrade(revision, url=backend_url, migrations=recipes)
                time.sleep(0.2)
            finally:
                app.stop.set()
                for worker in workers:
                    worker.join(timeout=60)
            assert app.errors == [], f"at {revision}: {app.errors[:3]}"
            assert migrations.current(url=backend_url) == revision
            del deployed
        final = _steps()[-1][2]
        reads = ", ".join(f"{column} AS {name}" for name, column in final.reads.items())
        with engine.connect() as conn:
            rows = {r.id: r for r in conn.execute(text(f"SELECT id, {reads} FROM invoices"))}
        assert set(rows) == set(written)  # no row lost
        for row, values in written.items():
            assert rows[row].text == f"v{values[TEXT]}"
            assert rows[row].qty == values[QTY]
            assert rows[row].amount == values.get(AMOUNT, 0)
        with pytest.raises(IntegrityError), engine.begin() as conn:  # NOT NULL is in force
            conn.execute(
                text("INSERT INTO invoices (id, memo, quantity, amount) VALUES (0, 'x', 1, NULL)")
            )
    finally:
        engine.dispose()


def test_the_recipes_pass_the_safety_check(
    recipes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "recipe_models.py").write_text(
        "import sqlalchemy as sa\n"
        "metadata = sa.MetaData()\n"
        'sa.Table("invoices", metadata, sa.Column("id", sa.Integer, primary_key=True), '
        'sa.Column("memo", sa.String(50)), sa.Column("quantity", sa.BigInteger), '
        'sa.Column("amount", sa.Integer, nullable=False))\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    findings = migrations.lint(migrations=recipes, metadata="recipe_models:metadata")
    assert [str(finding) for finding in findings] == []
