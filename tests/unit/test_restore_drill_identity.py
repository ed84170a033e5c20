"""A drill's target is proven distinct from its source by identity, not by the host string (issue 13 item 3):
where both resolve, PostgreSQL's system_identifier and database OID, Redis's run_id (real servers here)."""

from __future__ import annotations

import uuid

import pytest
import redis

from runbook_operator.clients import postgres as pg
from runbook_operator.errors import RunbookError
from runbook_operator.reconcilers.drills import Endpoint, postgres_identity, redis_identity, refuse_source, resolved
from tests.services import Postgres, Redis


def test_names_of_one_address_resolve_alike() -> None:
    assert ("127.0.0.1", 5432) in resolved("localhost", 5432)
    assert resolved("127.0.0.1", 5432) == {("127.0.0.1", 5432)}
    assert resolved("::ffff:127.0.0.1", 5432) == {("127.0.0.1", 5432)}  # IPv4-mapped counts as IPv4
    assert resolved("0.0.0.0", 5432) == {("127.0.0.1", 5432)}  # reaches the loopback
    assert resolved("no-such-host.invalid", 5432) == frozenset()


def endpoint(where: str, host: str, database: str | None, identity: tuple[str, ...]) -> Endpoint:
    return Endpoint(where, resolved(host, 5432), database, identity)


def test_the_same_address_and_database_is_the_source_whatever_the_name() -> None:
    source = endpoint("localhost:5432/app", "localhost", "app", ("1", "16384"))
    with pytest.raises(RunbookError) as refused:
        refuse_source("db", target=endpoint("127.0.0.1:5432/app", "127.0.0.1", "app", ("", "")), source=source)
    assert refused.value.reason == "TargetIsSource"
    assert refused.value.message.startswith(
        "BackupPolicy db spec.verification.target: 127.0.0.1:5432/app is the source localhost:5432/app (both reach "
        "127.0.0.1:5432 and database app)"
    )
    # another database of the same server is a scratch database
    refuse_source(
        "db", target=endpoint("127.0.0.1:5432/scratch", "127.0.0.1", "scratch", ("1", "16999")), source=source
    )


def test_a_server_that_says_it_is_the_source_is_refused_under_any_name() -> None:
    source = endpoint("db.team-a.svc:5432/app", "no-such-host.invalid", "app", ("7714", "16384"))
    target = endpoint("10.0.0.9:5432/app", "no-such-host.invalid", "app", ("7714", "16384"))
    with pytest.raises(RunbookError, match="the same system_identifier and database OID"):
        refuse_source("db", target=target, source=source)
    redis_source = Endpoint("redis:6379", frozenset(), None, ("abc",))
    with pytest.raises(RunbookError, match="the same run_id"):
        refuse_source("db", target=Endpoint("scratch:6379", frozenset(), None, ("abc",)), source=redis_source)
    refuse_source("db", target=Endpoint("scratch:6379", frozenset(), None, ("def",)), source=redis_source)


def test_postgres_identity_is_the_cluster_and_the_database(postgres: Postgres) -> None:
    scratch = f"scratch_{uuid.uuid4().hex[:8]}"
    with postgres.connect() as admin:
        admin.execute(f"CREATE DATABASE {scratch}")
        admin.execute("CREATE ROLE drill_reader LOGIN PASSWORD 'drill-reader-pw-1'")  # no privileges at all

    def identity(host: str, database: str) -> tuple[str, ...]:
        with pg.connect(
            host=host, port=postgres.port, database=database, user="drill_reader", password="drill-reader-pw-1"
        ) as conn:
            return postgres_identity(conn)

    assert identity("127.0.0.1", "postgres") == identity("localhost", "postgres")
    assert identity("127.0.0.1", scratch)[0] == identity("127.0.0.1", "postgres")[0]  # one cluster ...
    assert identity("127.0.0.1", scratch)[1] != identity("127.0.0.1", "postgres")[1]  # ... two databases


def test_redis_identity_is_the_server_process(redis_server: Redis) -> None:
    client = redis_server.client()
    (run_id,) = redis_identity(client)
    other_name = redis.Redis(host="localhost", port=redis_server.port, password=redis_server.password)
    assert len(run_id) == 40 and redis_identity(other_name) == (run_id,)
