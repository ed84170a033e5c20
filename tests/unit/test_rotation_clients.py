"""The rotation's PostgreSQL and Redis adapters against real servers."""

from __future__ import annotations

import uuid

import pytest
import redis

from runbook_operator.clients import postgres as pg
from runbook_operator.clients import redis as redis_client
from tests.services import Postgres, Redis


def login(server: Postgres, user: str, password: str) -> bool:
    return pg.login_works(host=server.host, port=server.port, database="postgres", user=user, password=password)


def test_postgres_password_change_never_reaches_the_server_log(postgres: Postgres) -> None:
    role = f"app_{uuid.uuid4().hex[:8]}"
    old, new = f"old-{uuid.uuid4().hex}", f"new-{uuid.uuid4().hex}"
    with postgres.connect() as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        pg.set_password(admin, role, old)
        assert login(postgres, role, old)
        assert pg.role_exists(admin, role)
        assert not pg.role_exists(admin, role + "_missing")
        pg.set_password(admin, role, new)
    assert login(postgres, role, new)
    assert not login(postgres, role, old)
    log = postgres.server_log()
    assert f'ALTER ROLE "{role}" WITH PASSWORD \'SCRAM-SHA-256$' in log  # log_statement = all logs it ...
    assert old not in log and new not in log  # ... with a SCRAM verifier, never the password


def test_postgres_member_role_is_created_then_reused(postgres: Postgres) -> None:
    group = f"grp_{uuid.uuid4().hex[:8]}"
    with postgres.connect() as admin:
        admin.execute(f"CREATE ROLE {group} NOLOGIN")
        admin.execute(f"GRANT pg_read_all_settings TO {group}")
        pg.set_member_password(admin, f"{group}_a", group, "first-password-1")
        pg.set_member_password(admin, f"{group}_a", group, "second-password-2")
        member = admin.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", (f"{group}_a", group)).fetchone()
        assert member == (True,)
    assert login(postgres, f"{group}_a", "second-password-2")
    assert not login(postgres, f"{group}_a", "first-password-1")
    with postgres.connect(user=f"{group}_a", password="second-password-2") as conn:
        assert conn.execute("SELECT current_user").fetchone() == (group,)  # sessions act as the group


def test_postgres_unreachable_raises_instead_of_answering() -> None:
    import psycopg

    from tests.services import free_port

    with pytest.raises(psycopg.OperationalError):
        pg.login_works(host="127.0.0.1", port=free_port(), database="postgres", user="x", password="y")


def test_redis_adds_then_keeps_only_the_new_password(redis_server: Redis) -> None:
    user = f"app-{uuid.uuid4().hex[:8]}"
    admin = redis_client.connect(
        host=redis_server.host,
        port=redis_server.port,
        tls=None,
        material=None,
        user="default",
        password=redis_server.password,
    )
    assert not redis_client.user_exists(admin, user)
    admin.execute_command("ACL", "SETUSER", user, "on", ">old-password-1", "~*", "+@all")
    assert redis_client.user_exists(admin, user)

    def works(password: str) -> bool:
        return redis_client.login_works(
            host=redis_server.host, port=redis_server.port, tls=None, material=None, user=user, password=password
        )

    redis_client.add_password(admin, user, "new-password-2")
    assert works("old-password-1") and works("new-password-2")
    redis_client.keep_only_password(admin, user, "new-password-2")
    assert works("new-password-2") and not works("old-password-1")
    rules = " ".join(str(part) for part in admin.execute_command("ACL", "LIST"))
    assert "new-password-2" not in rules  # stored as a SHA-256 hash only


def test_redis_unreachable_raises_instead_of_answering() -> None:
    from tests.services import free_port

    with pytest.raises(redis.ConnectionError):
        redis_client.login_works(host="127.0.0.1", port=free_port(), tls=None, material=None, user="x", password="y")
