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


def test_postgres_refuses_the_admin_login_and_privileged_roles(postgres: Postgres) -> None:
    suffix = uuid.uuid4().hex[:8]
    plain, group, member = f"plain_{suffix}", f"grp_{suffix}", f"mem_{suffix}"
    with postgres.connect() as admin:
        admin.execute(f"CREATE ROLE {plain} LOGIN")
        admin.execute(f"CREATE ROLE {group} NOLOGIN")
        admin.execute(f"GRANT pg_read_all_settings TO {group}")  # a harmless predefined role
        admin.execute(f"CREATE ROLE {member} LOGIN IN ROLE {group}")
        assert pg.rotation_refusal(admin, plain) is None
        assert pg.rotation_refusal(admin, member) is None
        assert pg.rotation_refusal(admin, postgres.superuser) == "it is the admin login (adminSecretRef) itself"
        for attribute in ("SUPERUSER", "CREATEROLE", "REPLICATION", "BYPASSRLS"):
            role = f"{attribute.lower()}_{suffix}"
            admin.execute(f"CREATE ROLE {role} LOGIN {attribute}")
            assert pg.rotation_refusal(admin, role) == f"it has {attribute}"
        admin.execute(f"GRANT createrole_{suffix} TO {group}")  # the member inherits through the group
        assert pg.rotation_refusal(admin, member) == f"it is a member of role createrole_{suffix}, which has CREATEROLE"
        admin.execute(f"REVOKE createrole_{suffix} FROM {group}")
        admin.execute(f"GRANT pg_execute_server_program TO {group}")
        assert pg.rotation_refusal(admin, member) == (
            "it is a member of role pg_execute_server_program, which has access to the server's files"
        )


def test_postgres_dual_login_role_is_created_without_privileges(postgres: Postgres) -> None:
    group = f"grp_{uuid.uuid4().hex[:8]}"
    with postgres.connect() as admin:
        admin.execute(f"CREATE ROLE {group} NOLOGIN")
        pg.set_member_password(admin, f"{group}_a", group, "first-password-1")
        row = admin.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls FROM pg_roles"
            " WHERE rolname = %s",
            (f"{group}_a",),
        ).fetchone()
        assert row == (False, False, False, False, False)
        assert pg.rotation_refusal(admin, f"{group}_a") is None


def test_redis_names_a_user_that_may_administer_the_server(redis_server: Redis) -> None:
    admin = redis_server.client()
    suffix = uuid.uuid4().hex[:8]
    admin.execute_command("ACL", "SETUSER", f"app-{suffix}", "on", ">pw-1", "~*", "+@all", "-@admin")
    admin.execute_command("ACL", "SETUSER", f"all-{suffix}", "on", ">pw-1", "~*", "+@all")
    admin.execute_command("ACL", "SETUSER", f"acl-{suffix}", "on", ">pw-1", "~*", "+get", "+acl")
    admin.execute_command("ACL", "SETUSER", f"cfg-{suffix}", "on", ">pw-1", "~*", "+@admin", "-acl")
    assert redis_client.admin_command(admin, f"app-{suffix}") is None
    assert redis_client.admin_command(admin, f"all-{suffix}") == "acl setuser"
    assert redis_client.admin_command(admin, f"acl-{suffix}") == "acl setuser"
    assert redis_client.admin_command(admin, f"cfg-{suffix}") == "config set"
    assert redis_client.admin_command(admin, "default") == "acl setuser"
