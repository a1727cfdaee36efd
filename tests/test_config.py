"""Where the URL comes from, and how it is shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from dbsession import DbSessionFactory, mask_url
from dbsession.errors import InvalidURLError


def test_explicit_url_wins_over_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "sqlite:///from-env.sqlite3")
    factory = DbSessionFactory("sqlite:///from-argument.sqlite3")
    assert factory.url.database == "from-argument.sqlite3"
    assert factory.settings.source == "argument"


def test_database_url_is_used_without_an_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "sqlite:///from-env.sqlite3")
    factory = DbSessionFactory()
    assert factory.url.database == "from-env.sqlite3"
    assert factory.settings.source == "DATABASE_URL"


def test_default_is_an_sqlite_file_in_the_working_directory() -> None:
    factory = DbSessionFactory()
    assert factory.url.get_backend_name() == "sqlite"
    assert factory.url.database == str(Path.cwd() / "dbsession.sqlite3")
    assert factory.settings.source == "default"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg"),
        ("postgres://u@h/db", "postgresql+psycopg"),
        ("postgres+psycopg://u@h/db", "postgresql+psycopg"),
        ("mysql://u@h/db", "mysql+pymysql"),
        ("mariadb://u@h/db", "mariadb+pymysql"),
        ("mysql+mysqldb://u@h/db", "mysql+mysqldb"),
        ("sqlite:///x.db", "sqlite"),
    ],
)
def test_bare_schemes_get_the_driver_dbsession_ships(given: str, expected: str) -> None:
    assert DbSessionFactory(given).url.drivername == expected


def test_empty_url_argument_is_an_error() -> None:
    with pytest.raises(InvalidURLError, match="url argument is empty"):
        DbSessionFactory("  ")


def test_empty_database_url_is_an_error_not_a_silent_sqlite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "")
    with pytest.raises(InvalidURLError, match="DATABASE_URL environment variable is empty"):
        DbSessionFactory()


def test_malformed_url_is_an_error_that_shows_the_expected_form() -> None:
    with pytest.raises(InvalidURLError, match="cannot be parsed.*dialect\\+driver://"):
        DbSessionFactory("not a url")


def test_mask_url_hides_password_and_secret_query_values() -> None:
    url = make_url("postgresql+psycopg://app:s3cret@db:5432/app?sslpassword=k3y&sslmode=require")
    masked = mask_url(url)
    assert "s3cret" not in masked
    assert "k3y" not in masked
    assert "app:***@db:5432/app" in masked
    assert "sslmode=require" in masked


def test_mask_url_masks_unparseable_strings_too() -> None:
    assert "s3cret" not in mask_url("postgresql://app:s3cret@db:notaport/app")
