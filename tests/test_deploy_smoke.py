from __future__ import annotations
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL
from deploy_fixtures import Bouncer, Replica

def test_components(pgbouncer: Bouncer, pgbouncer_session: Bouncer, replica: Replica, postgresql_url: URL) -> None:
    for url in (pgbouncer.url(postgresql_url), pgbouncer_session.url(postgresql_url), replica.url(postgresql_url)):
        e = create_engine(url)
        with e.connect() as c:
            print(url.port, c.execute(text("select pg_is_in_recovery()")).scalar())
        e.dispose()
