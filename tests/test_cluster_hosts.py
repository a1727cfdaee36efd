"""hosts_of: every host a multi-host URL names, for a connect failure's message."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import URL, make_url

from dbsession import DatabaseUnreachableError, DbSessionFactory
from dbsession._config import hosts_of


@pytest.mark.parametrize(
    ("url", "hosts"),
    [
        ("postgresql+psycopg://u:secret@db:5433/app", ["db:5433"]),
        ("postgresql+psycopg://u@/app", ["localhost:5432"]),
        ("mysql+pymysql://root@127.0.0.1/test", ["127.0.0.1:3306"]),
        (
            "postgresql+psycopg://u:secret@/app?host=a:5432&host=b:5433"
            "&target_session_attrs=read-write",
            ["a:5432", "b:5433"],
        ),
        ("postgresql+psycopg://u@/app?host=a,b&port=5432,5433", ["a:5432", "b:5433"]),
        ("postgresql+psycopg://u@/app?host=a,b&port=6000", ["a:6000", "b:6000"]),
        ("postgresql+psycopg://u@/app?host=a,b", ["a:5432", "b:5432"]),
        ("postgresql+psycopg://u@/app?host=/run/postgresql", ["/run/postgresql"]),
        ("postgresql+psycopg://u@/app?host=[::1]:5433&host=b", ["::1:5433", "b:5432"]),
    ],
)
def test_every_host_is_named_in_order(url: str, hosts: list[str]) -> None:
    assert hosts_of(make_url(url)) == hosts


def test_no_secret_in_the_hosts() -> None:
    url = make_url("postgresql+psycopg://u:hunter2@/app?host=a:1&host=b:2&password=hunter2")
    assert "hunter2" not in " ".join(hosts_of(url))


@pytest.mark.backends("postgresql")
def test_a_connect_failure_names_every_host_of_a_multi_host_url(backend_url: URL) -> None:
    """It named "localhost:5432", a host not in the URL."""
    url = backend_url.set(host=None, port=None).update_query_dict(
        {"host": "127.0.0.1:1,127.0.0.2:2", "connect_timeout": "2"}
    )
    factory = DbSessionFactory(url)
    try:
        with pytest.raises(DatabaseUnreachableError) as caught:
            with factory.engine.connect():
                pass
    finally:
        factory.dispose()
    assert "127.0.0.1:1, 127.0.0.2:2" in str(caught.value)
    assert "localhost" not in str(caught.value)


@pytest.mark.backends("mysql")
@pytest.mark.parametrize("side", ["sync", "async"])
def test_a_mysql_host_list_connects_to_the_first_node_that_answers(
    backend_url: URL, side: str
) -> None:
    """PyMySQL and aiomysql take one host: dbsession's connector tries the list in order
    (a node that is down is skipped), and a failure names every node, masked."""
    import asyncio

    from sqlalchemy import text

    from dbsession._config import async_twin
    from dbsession.asyncio import AsyncDbSessionFactory

    live = f"{backend_url.host}:{backend_url.port or 3306}"
    listed = backend_url.set(host=None, port=None).update_query_pairs(
        [("host", "127.0.0.1:1"), ("host", live)]
    )
    dead = backend_url.set(host=None, port=None, password="Pw-9c2d").update_query_pairs(
        [("host", "127.0.0.1:1"), ("host", "127.0.0.1:2")]
    )
    if side == "sync":
        factory = DbSessionFactory(listed)
        try:
            with factory.session_scope() as session:
                assert session.execute(text("SELECT 1")).scalar_one() == 1
        finally:
            factory.dispose()
        broken = DbSessionFactory(dead)
        try:
            with pytest.raises(DatabaseUnreachableError) as caught:
                with broken.engine.connect():
                    pass
        finally:
            broken.dispose()
    else:

        async def main() -> BaseException:
            made = AsyncDbSessionFactory(async_twin(listed))
            try:
                async with made.session_scope() as session:
                    assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
            finally:
                await made.dispose()
            broken = AsyncDbSessionFactory(async_twin(dead))
            try:
                async with broken.engine.connect():
                    pass
            except DatabaseUnreachableError as error:
                return error
            finally:
                await broken.dispose()
            raise AssertionError("connected to nodes that are down")

        caught_error = asyncio.run(main())
        assert "127.0.0.1:1, 127.0.0.1:2" in str(caught_error)
        assert "Pw-9c2d" not in str(caught_error)
        return
    assert "127.0.0.1:1, 127.0.0.1:2" in str(caught.value)
    assert "Pw-9c2d" not in str(caught.value)
