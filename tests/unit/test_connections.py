"""Verified, authenticated database connections: PostgreSQL's verify-full against a real TLS server, SCRAM only
(a server asking for a cleartext or MD5 password gets none), and when a connection needs the plaintext opt-out."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import psycopg
import pytest

from runbook_operator.clients import postgres as pg
from runbook_operator.models.sources import PostgresConnection, RedisConnection, plaintext_problem
from tests.services import CertificateAuthority, CleartextTrap, Postgres

PASSWORD = "trap-me-if-you-can-7f3a"


@pytest.fixture(scope="module")
def postgres_tls() -> Iterator[Postgres]:
    """The session server's twin that also speaks TLS, with a certificate naming only ``localhost``."""
    with Postgres(tls=True) as server:
        yield server


@pytest.fixture
def trap(request: pytest.FixtureRequest) -> Iterator[CleartextTrap]:
    with CleartextTrap(request.param) as server:
        yield server


def _options(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """The libpq options the connection was made with (those set, defaults included)."""
    return {o.keyword.decode(): o.val.decode() for o in conn.pgconn.info if o.val is not None}


def _user() -> str:
    return f"probe_{uuid.uuid4().hex[:10]}"


# --- verify-full against a real server ------------------------------------------------------------------


def test_verify_full_with_the_servers_ca_connects_over_tls(postgres_tls: Postgres) -> None:
    server = postgres_tls
    with pg.connect(
        host=server.TLS_NAME,
        port=server.port,
        database="postgres",
        user=server.superuser,
        password=server.password,
        ca=server.ca.pem,
    ) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
        assert (
            _options(conn).items()
            >= {"sslmode": "verify-full", "require_auth": "scram-sha-256", "gssencmode": "disable"}.items()
        )

    def login(password: str) -> bool:
        return pg.login_works(
            host=server.TLS_NAME,
            port=server.port,
            database="postgres",
            user=server.superuser,
            password=password,
            ca=server.ca.pem,
        )

    assert login(server.password)
    assert not login("not-the-password")  # over verified TLS a wrong password is a refused login


def test_without_a_ca_the_connection_is_scram_only_and_unverified(postgres: Postgres) -> None:
    """Today's call sites (no ca): the session server (scram-sha-256, no TLS) still accepts them."""
    with pg.connect(
        host=postgres.host, port=postgres.port, database="postgres", user=postgres.superuser, password=postgres.password
    ) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (False,)
        assert (
            _options(conn).items()
            >= {"sslmode": "prefer", "require_auth": "scram-sha-256", "gssencmode": "disable"}.items()
        )
        assert "sslrootcert" not in _options(conn)


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("another CA", "tls.caSecretRef: the server's certificate is not signed by this CA"),
        ("a name the certificate lacks", "host: the server's certificate does not name this host"),
        ("not a certificate", "tls.caSecretRef: not a PEM certificate"),
    ],
)
def test_a_certificate_that_fails_verify_full_stops_before_any_login(
    postgres_tls: Postgres, tmp_path: Path, case: str, problem: str
) -> None:
    server, user = postgres_tls, _user()
    host, ca = {
        "another CA": (server.TLS_NAME, CertificateAuthority(tmp_path, name="someone else's CA").pem),
        "a name the certificate lacks": ("127.0.0.1", server.ca.pem),  # the certificate names localhost only
        "not a certificate": (server.TLS_NAME, "-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n"),
    }[case]
    with pytest.raises(psycopg.OperationalError) as caught:
        pg.connect(host=host, port=server.port, database="postgres", user=user, password=PASSWORD, ca=ca)
    assert pg.tls_problem(caught.value) == problem
    assert not pg.refused(caught.value)  # not an answer about the login: the login was never attempted
    assert PASSWORD not in str(caught.value)
    log = server.server_log()
    assert "connection received" in log  # log_connections is on: a StartupMessage would name the user ...
    assert user not in log  # ... and none arrived, so no password exchange began either


def test_verify_full_to_a_server_without_tls_sends_nothing(postgres_tls: Postgres) -> None:
    with CleartextTrap("cleartext") as trap:
        with pytest.raises(psycopg.OperationalError) as caught:
            pg.connect(
                host=trap.host, port=trap.port, database="d", user=_user(), password=PASSWORD, ca=postgres_tls.ca.pem
            )
        assert pg.tls_problem(caught.value) == "tls: the server does not offer TLS"
        assert trap.startups == [] and trap.received == b""  # not even the user name


# --- SCRAM only: a server asking for the password gets none ---------------------------------------------


@pytest.mark.parametrize("trap", ["cleartext", "md5"], indirect=True)
def test_a_server_asking_for_the_password_gets_none(trap: CleartextTrap) -> None:
    user = _user()
    with pytest.raises(psycopg.OperationalError) as caught:
        pg.connect(host=trap.host, port=trap.port, database="d", user=user, password=PASSWORD)
    assert 'authentication method requirement "scram-sha-256" failed' in str(caught.value)
    assert len(trap.startups) == 1 and user.encode() in trap.startups[0]  # it did reach the trap's request ...
    assert trap.received == b""  # ... and answered with no byte at all
    assert not trap.received_password()


@pytest.mark.parametrize("trap", ["cleartext", "md5"], indirect=True)
def test_login_works_does_not_mistake_the_trap_for_a_refused_login(trap: CleartextTrap) -> None:
    with pytest.raises(psycopg.OperationalError):  # an answer "False" would read as "the old password is gone"
        pg.login_works(host=trap.host, port=trap.port, database="d", user=_user(), password=PASSWORD)
    assert trap.received == b""


@pytest.mark.parametrize("trap", ["cleartext", "md5"], indirect=True)
def test_without_require_auth_the_trap_would_get_the_password(trap: CleartextTrap) -> None:
    """The control: libpq's defaults hand the password over, so the tests above can fail."""
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            host=trap.host, port=trap.port, dbname="d", user=_user(), password=PASSWORD, connect_timeout=5
        ).close()
    assert trap.received_password()
    if trap.method == "cleartext":
        assert trap.received == b"p" + (4 + len(PASSWORD) + 1).to_bytes(4, "big") + PASSWORD.encode() + b"\0"
    else:
        assert trap.received.startswith(b"p") and b"md5" in trap.received  # md5(md5(password + user) + salt)


# --- which connections need the opt-out -----------------------------------------------------------------


def _postgres(**fields: Any) -> PostgresConnection:
    return PostgresConnection.model_validate(
        {"host": "db.team-a.svc", "database": "app", "credentialsSecretRef": {"name": "db"}, **fields}
    )


def _redis(**fields: Any) -> RedisConnection:
    return RedisConnection.model_validate({"host": "redis.team-a.svc", **fields})


CA = {"caSecretRef": {"name": "db-ca", "key": "ca.crt"}}
PASSWORD_REF = {"passwordSecretRef": {"name": "redis", "key": "password"}}
POSTGRES_PROBLEM = (
    "spec.source.postgresql: the login would cross the network without verified TLS: set "
    "spec.source.postgresql.tls.caSecretRef, or spec.source.postgresql.insecurePlaintext: true to accept that"
)
REDIS_PROBLEM = (
    "spec.source.redis: the password would be sent over plain TCP: set spec.source.redis.tls, "
    "or spec.source.redis.insecurePlaintext: true to accept that"
)
Kind = Literal["postgresql", "redis"]


@pytest.mark.parametrize(
    ("kind", "fields", "problem"),
    [
        ("postgresql", {}, POSTGRES_PROBLEM),
        ("postgresql", {"tls": CA}, None),
        ("postgresql", {"insecurePlaintext": True}, None),
        ("postgresql", {"tls": CA, "insecurePlaintext": True}, None),
        ("postgresql", {"insecurePlaintext": False}, POSTGRES_PROBLEM),
        ("redis", {}, None),  # no password: nothing to protect
        ("redis", {"insecurePlaintext": True}, None),
        ("redis", {"tls": {}}, None),
        ("redis", PASSWORD_REF, REDIS_PROBLEM),
        ("redis", {**PASSWORD_REF, "tls": {"enabled": False}}, REDIS_PROBLEM),
        ("redis", {**PASSWORD_REF, "tls": {"enabled": True}}, None),
        ("redis", {**PASSWORD_REF, "tls": {"caSecretRef": {"name": "redis-ca", "key": "ca.crt"}}}, None),
        ("redis", {**PASSWORD_REF, "insecurePlaintext": True}, None),
        ("redis", {**PASSWORD_REF, "tls": {"enabled": False}, "insecurePlaintext": True}, None),
        ("redis", {**PASSWORD_REF, "tls": {}, "insecurePlaintext": True}, None),
    ],
)
def test_plaintext_problem(kind: Kind, fields: dict[str, Any], problem: str | None) -> None:
    connection = _postgres(**fields) if kind == "postgresql" else _redis(**fields)
    assert plaintext_problem(connection, f"spec.source.{kind}") == problem


def test_new_fields_default_to_what_existing_specs_mean() -> None:
    postgres, redis = _postgres(), _redis()
    assert (postgres.tls, postgres.insecure_plaintext, redis.insecure_plaintext) == (None, False, False)
    assert "tls" not in postgres.to_api() and postgres.to_api()["insecurePlaintext"] is False
    assert _postgres(tls=CA).to_api()["tls"] == {"caSecretRef": {"name": "db-ca", "key": "ca.crt"}}
    with pytest.raises(ValueError, match="caSecretRef"):
        _postgres(tls={})
