"""The backup agent run as a process (as its CronJob pod runs it) against real PostgreSQL, Redis, gpg and the
S3 API server; each backup is then restored by hand with stock tools, and each failure leaves nothing."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from tests.backup_support import (
    agent_env,
    bucket_keys,
    manifest_of,
    new_bucket,
    pending_uploads,
    policy_spec,
    run_agent,
    start_agent,
)
from tests.services import (
    CertificateAuthority,
    GpgKeyring,
    Postgres,
    Redis,
    RunbookRedis,
    S3Server,
    free_port,
    wait_port,
)

from runbook_operator.models.plans import (
    GPG_PASSPHRASE_ENV,
    MANIFEST_KEY_ENV,
    REDIS_PASSWORD_ENV,
    SPEC_ENV,
    manifest_signed,
)

BACKUP_USER = "backup_reader"
BACKUP_PASSWORD = "backup-reader-pw-1"
TABLES = ("customers", "orders", "events")
# About 110 MB of rows, generated server-side.
CREATE_TABLES = [
    "CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL)",
    "INSERT INTO customers SELECT g, 'customer ' || g, 'c' || g || '@example.com' FROM generate_series(1, 50000) g",
    "CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers, amount numeric(10,2), note text)",
    "INSERT INTO orders SELECT g, 1 + g % 50000, (g % 10000) / 100.0, md5(g::text) FROM generate_series(1, 200000) g",
    "CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz NOT NULL, payload text NOT NULL)",
    "INSERT INTO events SELECT g, timestamptz '2026-01-01' + g * interval '1 second', "
    "repeat(md5(g::text), 4) FROM generate_series(1, 560000) g",
]


def pg_source(postgres: Postgres, database: str) -> dict[str, Any]:
    return {
        "postgresql": {
            "host": postgres.host,
            "port": postgres.port,
            "database": database,
            "credentialsSecretRef": {"name": "db-credentials"},
            "insecurePlaintext": True,
        }
    }


def pg_env(password: str = BACKUP_PASSWORD) -> dict[str, str]:
    return {"PGUSER": BACKUP_USER, "PGPASSWORD": password}


def table_fingerprints(postgres: Postgres, database: str) -> dict[str, tuple[int, str]]:
    """Row count and an order-independent-of-storage checksum of every table."""
    with postgres.connect(database) as conn:
        return {
            table: conn.execute(
                f"SELECT count(*), md5(coalesce(string_agg(md5(t::text), '' ORDER BY id), '')) FROM {table} t"
            ).fetchone()
            for table in TABLES
        }


@pytest.fixture(scope="module")
def big_database(postgres: Postgres) -> str:
    """A database with three tables and at least 100 MB of rows; the agent logs in as a read-only role."""
    name = f"shop_{uuid.uuid4().hex[:6]}"
    with postgres.connect() as conn:
        conn.execute(f"CREATE DATABASE {name}")
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (BACKUP_USER,)).fetchone() is None:
            conn.execute(f"CREATE ROLE {BACKUP_USER} LOGIN PASSWORD '{BACKUP_PASSWORD}' IN ROLE pg_read_all_data")
    with postgres.connect(name) as conn:
        for statement in CREATE_TABLES:
            conn.execute(statement)
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    assert size >= 100 * 1024 * 1024, size
    return name


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    return new_bucket(s3_server)


def assert_nothing_stored(s3: S3Server, bucket: str) -> None:
    """A failed run leaves no data object, no manifest and no open multipart upload."""
    assert bucket_keys(s3, bucket) == []
    assert pending_uploads(s3, bucket) == []


def assert_failed(result: subprocess.CompletedProcess[str], reason: str, *secrets: str) -> str:
    assert result.returncode != 0, result.stdout
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"backup failed: {reason}: "), result.stderr
    for secret in secrets:
        assert secret not in result.stderr + result.stdout
    return line


def test_postgres_round_trip_with_stock_tools(
    postgres: Postgres, big_database: str, s3_server: S3Server, gpg_keyring: GpgKeyring, bucket: str, tmp_path: Path
) -> None:
    spec = policy_spec(pg_source(postgres, big_database), s3_server, bucket)
    result = run_agent(agent_env(spec, s3_server, gpg_keyring, **pg_env()))
    assert result.returncode == 0, result.stderr

    keys = bucket_keys(s3_server, bucket)
    manifest = manifest_of(s3_server, bucket)
    data_key = manifest["data"]["key"]
    assert keys == sorted([data_key, data_key.rsplit("/", 1)[0] + "/manifest.json"])
    assert data_key.startswith("backups/hungryhippaahneties/db/") and data_key.endswith("/postgresql.dump.gpg")
    assert manifest["job"] == "test-job" and manifest["policy"]["generation"] == 1
    assert manifest["encryption"]["recipients"] == [gpg_keyring.fingerprint]
    assert manifest["source"]["serverVersion"] and manifest["source"]["tool"].startswith("pg_dump")
    before = table_fingerprints(postgres, big_database)
    assert manifest["source"]["tableRowCounts"] == {f"public.{t}": before[t][0] for t in TABLES}

    # By hand, as the runbook's restore procedure: download, check, gpg --decrypt, pg_restore into a fresh db.
    encrypted = tmp_path / "backup.dump.gpg"
    s3_server.client().download_file(bucket, data_key, str(encrypted))
    assert encrypted.stat().st_size == manifest["data"]["sizeBytes"]
    sha = subprocess.run(["sha256sum", str(encrypted)], capture_output=True, text=True, check=True).stdout.split()[0]
    assert sha == manifest["data"]["sha256"]
    dump = tmp_path / "backup.dump"
    gpg_keyring.run("--output", str(dump), "--decrypt", str(encrypted))
    dump.chmod(0o644)
    tmp_path.chmod(0o755)
    fresh = f"restored_{uuid.uuid4().hex[:6]}"
    with postgres.connect() as conn:
        conn.execute(f"CREATE DATABASE {fresh}")
    subprocess.run(
        [
            "pg_restore",
            "--no-owner",
            "--exit-on-error",
            "-h",
            postgres.host,
            "-p",
            str(postgres.port),
            "-U",
            postgres.superuser,
            "-d",
            fresh,
            str(dump),
        ],
        env={**os.environ, "PGPASSWORD": postgres.password},
        check=True,
        capture_output=True,
    )
    assert table_fingerprints(postgres, fresh) == before


@pytest.fixture
def small_database(postgres: Postgres) -> str:
    name = f"small_{uuid.uuid4().hex[:6]}"
    with postgres.connect() as conn:
        conn.execute(f"CREATE DATABASE {name}")
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (BACKUP_USER,)).fetchone() is None:
            conn.execute(f"CREATE ROLE {BACKUP_USER} LOGIN PASSWORD '{BACKUP_PASSWORD}' IN ROLE pg_read_all_data")
    with postgres.connect(name) as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO notes SELECT g, md5(g::text) FROM generate_series(1, 1000) g")
    return name


def test_symmetric_passphrase_round_trip(
    postgres: Postgres, small_database: str, s3_server: S3Server, gpg_keyring: GpgKeyring, bucket: str
) -> None:
    passphrase = "runbook-symmetric-passphrase"
    spec = policy_spec(
        pg_source(postgres, small_database),
        s3_server,
        bucket,
        encryption={"gpg": {"passphraseSecretRef": {"name": "backup-gpg-passphrase", "key": "passphrase"}}},
    )
    result = run_agent(agent_env(spec, s3_server, None, **pg_env(), **{GPG_PASSPHRASE_ENV: passphrase}))
    assert result.returncode == 0, result.stderr
    assert passphrase not in result.stdout + result.stderr
    manifest = manifest_of(s3_server, bucket)
    assert manifest["encryption"]["mode"] == "symmetric" and manifest["encryption"]["cipher"] == "AES256"
    encrypted = s3_server.client().get_object(Bucket=bucket, Key=manifest["data"]["key"])["Body"].read()
    packets = gpg_keyring.run("--list-packets", "--passphrase", passphrase, stdin=encrypted).stdout.decode()
    assert "symkey enc packet: version 4, cipher 9" in packets  # cipher 9 is AES256
    dump = gpg_keyring.decrypt(encrypted, passphrase=passphrase)
    listing = subprocess.run(["pg_restore", "--list"], input=dump, capture_output=True, check=True).stdout
    assert b"TABLE DATA public notes" in listing


def test_redis_round_trip(
    redis_server: Redis, s3_server: S3Server, gpg_keyring: GpgKeyring, bucket: str, tmp_path: Path
) -> None:
    client = redis_server.client()
    client.flushall()
    client.mset({f"session:{i}": f"user-{i}" for i in range(2000)})
    client.hset("config", mapping={"mode": "strict", "ttl": "300"})
    client.rpush("queue", *[f"job-{i}" for i in range(100)])
    source = {
        "redis": {
            "host": redis_server.host,
            "port": redis_server.port,
            "passwordSecretRef": {"name": "redis-credentials", "key": "REDIS_PASSWORD"},
            "insecurePlaintext": True,
        }
    }
    spec = policy_spec(source, s3_server, bucket)
    result = run_agent(agent_env(spec, s3_server, gpg_keyring, **{REDIS_PASSWORD_ENV: redis_server.password}))
    assert result.returncode == 0, result.stderr
    assert redis_server.password not in result.stdout + result.stderr
    manifest = manifest_of(s3_server, bucket)
    assert manifest["source"]["keyspace"] == {"db0": 2002}

    # By hand: download, gpg --decrypt to dump.rdb, start a fresh redis-server on it.
    encrypted = s3_server.client().get_object(Bucket=bucket, Key=manifest["data"]["key"])["Body"].read()
    restored = tmp_path / "restored"
    restored.mkdir()
    (restored / "dump.rdb").write_bytes(gpg_keyring.decrypt(encrypted))
    with Redis(restored) as fresh:
        fresh_client = fresh.client()
        deadline = time.monotonic() + 30
        while fresh_client.info("persistence").get("loading") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fresh_client.dbsize() == 2002
        assert sorted(fresh_client.keys("*")) == sorted(client.keys("*"))
        assert fresh_client.get("session:1999") == b"user-1999"
        assert fresh_client.hgetall("config") == {b"mode": b"strict", b"ttl": b"300"}
        assert fresh_client.lrange("queue", 0, -1) == client.lrange("queue", 0, -1)


# --- failures: each leaves no data object, no manifest, no open upload, and exits with a one-line reason ---


def test_wrong_database_password(
    postgres: Postgres, small_database: str, s3_server: S3Server, gpg_keyring: GpgKeyring, bucket: str
) -> None:
    spec = policy_spec(pg_source(postgres, small_database), s3_server, bucket)
    result = run_agent(agent_env(spec, s3_server, gpg_keyring, **pg_env("not-the-password")))
    line = assert_failed(result, "SourceUnavailable", "not-the-password")
    assert "password authentication failed" in line
    assert_nothing_stored(s3_server, bucket)


def test_missing_credentials(
    postgres: Postgres, small_database: str, s3_server: S3Server, gpg_keyring: GpgKeyring, bucket: str
) -> None:
    """The pod's env lacks the password (its Secret key was missing): fail before touching anything."""
    spec = policy_spec(pg_source(postgres, small_database), s3_server, bucket)
    env = agent_env(spec, s3_server, gpg_keyring, PGUSER=BACKUP_USER)
    line = assert_failed(run_agent(env), "CredentialsMissing")
    assert "spec.source.postgresql.credentialsSecretRef" in line and "PGPASSWORD" in line
    assert_nothing_stored(s3_server, bucket)


def test_missing_bucket(postgres: Postgres, small_database: str, s3_server: S3Server, gpg_keyring: GpgKeyring) -> None:
    spec = policy_spec(pg_source(postgres, small_database), s3_server, "no-such-bucket-here")
    line = assert_failed(run_agent(agent_env(spec, s3_server, gpg_keyring, **pg_env())), "BucketNotFound")
    assert "spec.destination.s3.bucket" in line


def test_gpg_fails_on_a_bad_recipient(
    postgres: Postgres, small_database: str, s3_server: S3Server, tmp_path: Path, bucket: str
) -> None:
    """A key that imports but cannot encrypt (sign-only) is refused before anything is dumped or uploaded."""
    signer = GpgKeyring(tmp_path / "signer", email="signer@example.com")
    signer.home.mkdir(mode=0o700)
    signer.run("--quick-generate-key", "Signer <signer@example.com>", "ed25519", "sign", "never")
    sign_only = signer.run("--armor", "--export", "signer@example.com").stdout.decode()
    spec = policy_spec(pg_source(postgres, small_database), s3_server, bucket)
    env = agent_env(spec, s3_server, None, **pg_env(), RUNBOOK_GPG_RECIPIENTS=sign_only)
    assert_failed(run_agent(env), "RecipientCannotEncrypt")
    assert_nothing_stored(s3_server, bucket)


def test_a_key_swapped_into_the_config_map_after_the_reconcile_is_refused_by_the_agent(
    postgres: Postgres, small_database: str, s3_server: S3Server, gpg_keyring: GpgKeyring, tmp_path: Path, bucket: str
) -> None:
    """The pins come with the spec: the recipients' ConfigMap edited after the reconcile checked it (another
    encryption key in the pod's RUNBOOK_GPG_RECIPIENTS) stops the run before anything is dumped or uploaded."""
    other = GpgKeyring(tmp_path / "other", email="other@example.com").start()
    encryption = {
        "gpg": {
            "recipientsConfigMapRef": {"name": "backup-gpg-recipients", "key": "team.asc"},
            "fingerprints": [gpg_keyring.fingerprint],
        }
    }
    spec = policy_spec(pg_source(postgres, small_database), s3_server, bucket, encryption=encryption)
    line = assert_failed(run_agent(agent_env(spec, s3_server, other, **pg_env())), "RecipientNotPinned")
    assert f"spec.encryption.gpg.recipientsConfigMapRef: key {other.fingerprint}" in line
    assert "spec.encryption.gpg.fingerprints" in line
    assert_nothing_stored(s3_server, bucket)
    # the pinned key itself is accepted
    result = run_agent(agent_env(spec, s3_server, gpg_keyring, **pg_env()))
    assert result.returncode == 0, result.stderr
    assert manifest_of(s3_server, bucket)["encryption"]["recipients"] == [gpg_keyring.fingerprint]


def _children(pid: int) -> Iterator[tuple[int, str]]:
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            name = Path(f"/proc/{child}/comm").read_text().strip()
            yield int(child), name
            yield from _children(int(child))


def test_pg_dump_killed_mid_stream(
    postgres: Postgres, big_database: str, s3_server: S3Server, gpg_keyring: GpgKeyring, bucket: str
) -> None:
    spec = policy_spec(pg_source(postgres, big_database), s3_server, bucket)
    agent = start_agent(agent_env(spec, s3_server, gpg_keyring, **pg_env()))
    deadline = time.monotonic() + 120
    while not pending_uploads(s3_server, bucket) or not any(
        s3_server.client().list_parts(Bucket=bucket, Key=key, UploadId=upload["UploadId"]).get("Parts")
        for upload in s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        for key in [upload["Key"]]
    ):
        assert agent.poll() is None and time.monotonic() < deadline, "the agent ended before uploading a part"
        time.sleep(0.05)
    pg_dump = next(pid for pid, name in _children(agent.pid) if name == "pg_dump")
    os.kill(pg_dump, 9)
    stdout, stderr = agent.communicate(timeout=120)
    line = assert_failed(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr), "SourceFailed")
    assert "pg_dump exited with -9" in line
    assert_nothing_stored(s3_server, bucket)


class FlakyEndpoint:
    """A TCP relay in front of the S3 API server that the test can take away (connections reset, new ones
    refused) and bring back, as a network outage or a restarting S3 endpoint would look to the agent."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._connections: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
            self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._connections += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def test_s3_going_away_mid_upload(
    postgres: Postgres, big_database: str, s3_server: S3Server, gpg_keyring: GpgKeyring, bucket: str
) -> None:
    relay = FlakyEndpoint(s3_server.port)
    relay.up()
    spec = policy_spec(pg_source(postgres, big_database), s3_server, bucket)
    spec["destination"]["s3"]["endpoint"] = relay.endpoint
    agent = start_agent(agent_env(spec, s3_server, gpg_keyring, **pg_env()))
    client = s3_server.client()  # straight to the server, not through the relay
    deadline = time.monotonic() + 120
    while not any(
        client.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts")
        for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    ):
        assert agent.poll() is None and time.monotonic() < deadline, "the agent ended before uploading a part"
        time.sleep(0.05)
    relay.down()  # S3 goes away mid-upload
    assert agent.stderr is not None
    lines: list[str] = []
    for line in agent.stderr:
        lines.append(line)
        if "aborting the multipart upload" in line:
            relay.up()  # ...and comes back while the agent retries its abort
            break
    lines += agent.stderr.readlines()
    agent.wait(120)
    result = subprocess.CompletedProcess(agent.args, agent.returncode, "", "".join(lines))
    line = assert_failed(result, "UploadFailed", s3_server.secret_key)
    assert "could not be aborted" not in line
    assert_nothing_stored(s3_server, bucket)


def test_redis_over_tls_with_an_acl_user(
    s3_server: S3Server, gpg_keyring: GpgKeyring, bucket: str, tmp_path: Path
) -> None:
    """The runbook's Redis listens with TLS: the agent verifies the server against the CA from its Secret and
    logs in as an ACL user; the RDB still loads into a fresh redis-server."""
    authority = CertificateAuthority(tmp_path)
    ca, (cert, key) = authority.path, authority.issue("server", ips=("127.0.0.1",))
    port, password = free_port(), "backup-user-password"
    server = subprocess.Popen(
        [
            *("redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)),
            *("--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca)),
            *("--tls-auth-clients", "no", "--save", "", "--user", "backup", "on", f">{password}", "~*", "+@all"),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_port(port, process=server)
        client = redis.Redis(
            host="127.0.0.1", port=port, username="backup", password=password, ssl=True, ssl_ca_certs=str(ca)
        )
        client.mset({f"cart:{i}": i for i in range(500)})
        source = {
            "redis": {
                "host": "127.0.0.1",
                "port": port,
                "username": "backup",
                "tls": {"enabled": True, "caSecretRef": {"name": "redis-tls", "key": "ca.crt"}},
                "passwordSecretRef": {"name": "redis-credentials", "key": "password"},
            }
        }
        env = agent_env(
            policy_spec(source, s3_server, bucket),
            s3_server,
            gpg_keyring,
            **{REDIS_PASSWORD_ENV: password, "RUNBOOK_REDIS_CA_FILE": str(ca)},
        )
        result = run_agent(env)
        assert result.returncode == 0, result.stderr
        assert password not in result.stdout + result.stderr
        manifest = manifest_of(s3_server, bucket)
        assert manifest["source"]["keyspace"] == {"db0": 500}
        encrypted = s3_server.client().get_object(Bucket=bucket, Key=manifest["data"]["key"])["Body"].read()
        restored = tmp_path / "restored"
        restored.mkdir()
        (restored / "dump.rdb").write_bytes(gpg_keyring.decrypt(encrypted))
        with Redis(restored) as fresh:
            assert fresh.client().dbsize() == 500
            assert fresh.client().get("cart:499") == b"499"
        # Without the CA the server cannot be verified: the run fails before anything is stored.
        other = new_bucket(s3_server)
        env[SPEC_ENV] = json.dumps(policy_spec(source, s3_server, other))
        env["RUNBOOK_REDIS_CA_FILE"] = str(cert)  # a certificate that is not the CA
        assert_failed(run_agent(env), "SourceUnavailable", password)
        assert_nothing_stored(s3_server, other)
    finally:
        server.terminate()
        server.wait(10)


# --------------------------------------------------------------------------------- the runbook's own Redis


def runbook_redis_source(server: RunbookRedis, **overrides: Any) -> dict[str, Any]:
    """The sample's source (TLS on the runbook's port with client certificates, the renamed BGSAVE), aimed
    at the test server: 127.0.0.1, verified against the Service name its certificate carries."""
    tls: dict[str, Any] = {
        "caSecretRef": {"name": "redis-tls", "key": "ca.crt"},
        "clientCertificateSecretRef": {"name": "redis-tls"},
        "serverName": server.SERVER_NAME,
    }
    source: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "username": server.backup_user,
        "tls": tls,
        "commands": {"bgsave": server.BGSAVE},
        "passwordSecretRef": {"name": "redis-credentials", "key": "REDIS_PASSWORD"},
    }
    tls.update(overrides.pop("tls", {}))
    source.update(overrides)
    return {"redis": {k: v for k, v in source.items() if v is not None}}


def runbook_redis_env(
    server: RunbookRedis, source: dict[str, Any], s3: S3Server, keyring: GpgKeyring, bucket: str, **files: str
) -> dict[str, str]:
    """The pod's environment: the password from its Secret, the CA and the client pair as mounted files."""
    paths = {
        "RUNBOOK_REDIS_CA_FILE": str(server.ca.path),
        "RUNBOOK_REDIS_CERT_FILE": str(server.client_cert),
        "RUNBOOK_REDIS_KEY_FILE": str(server.client_key),
        **files,
    }
    return agent_env(
        policy_spec(source, s3, bucket), s3, keyring, **{REDIS_PASSWORD_ENV: server.backup_password}, **paths
    )


def test_runbook_redis_backup_with_client_certificates_and_the_renamed_bgsave(
    runbook_redis: RunbookRedis, s3_server: S3Server, gpg_keyring: GpgKeyring, bucket: str, tmp_path: Path
) -> None:
    """As the runbook's script: mutual TLS (CA, client certificate and key), the renamed BGSAVE, an ACL user,
    the server verified by its Service name over SNI; the RDB loads into a fresh redis-server."""
    client = runbook_redis.client()
    client.flushall()
    client.mset({f"patient-session:{i}": f"token-{i}" for i in range(700)})
    client.select(3)
    client.hset("rate-limits", mapping={"api": "100", "frontend": "50"})
    before = client.lastsave()
    source = runbook_redis_source(runbook_redis)
    result = run_agent(runbook_redis_env(runbook_redis, source, s3_server, gpg_keyring, bucket))
    assert result.returncode == 0, result.stderr
    key_pem = runbook_redis.client_key.read_text()
    for secret in (runbook_redis.backup_password, key_pem, key_pem.splitlines()[1]):
        assert secret not in result.stdout + result.stderr
    assert client.lastsave() > before  # the renamed BGSAVE ran
    manifest = manifest_of(s3_server, bucket)
    assert manifest["source"]["keyspace"] == {"db0": 700, "db3": 1}
    encrypted = s3_server.client().get_object(Bucket=bucket, Key=manifest["data"]["key"])["Body"].read()
    restored = tmp_path / "restored"
    restored.mkdir()
    (restored / "dump.rdb").write_bytes(gpg_keyring.decrypt(encrypted))
    with Redis(restored) as fresh:
        assert fresh.client().dbsize() == 700
        assert fresh.client().get("patient-session:699") == b"token-699"
        assert fresh.client(db=3).hgetall("rate-limits") == {b"api": b"100", b"frontend": b"50"}


def test_runbook_redis_failures_name_the_field(
    runbook_redis: RunbookRedis, s3_server: S3Server, gpg_keyring: GpgKeyring, tmp_path: Path
) -> None:
    """Each way the runbook's Redis refuses a backup ends it before anything is stored, with the reason and
    the spec field to fix, and without the password or the private key in the message."""
    other_ca = CertificateAuthority(tmp_path / "other-ca", name="some other CA")
    key_pem = runbook_redis.client_key.read_text()
    secrets = (runbook_redis.backup_password, key_pem, key_pem.splitlines()[1])
    plain = runbook_redis_source(runbook_redis, commands=None)
    no_cert = runbook_redis_source(runbook_redis, tls={"clientCertificateSecretRef": None})
    no_name = runbook_redis_source(runbook_redis, tls={"serverName": None})
    tls = "spec.source.redis.tls"
    cases: list[tuple[dict[str, Any], dict[str, str], str]] = [
        (plain, {}, "spec.source.redis.commands.bgsave: the server does not know the command BGSAVE"),
        (no_cert, {}, f"{tls}.clientCertificateSecretRef: the server requires a client certificate"),
        (
            runbook_redis_source(runbook_redis),
            {"RUNBOOK_REDIS_CA_FILE": str(other_ca.path)},
            f"{tls}.caSecretRef: the server's certificate is not signed by this CA",
        ),
        (no_name, {}, f"{tls}.serverName: the server's certificate is not valid for 127.0.0.1"),
    ]
    for source, files, message in cases:
        bucket = new_bucket(s3_server)
        env = runbook_redis_env(runbook_redis, source, s3_server, gpg_keyring, bucket, **files)
        if "clientCertificateSecretRef" not in source["redis"]["tls"]:
            del env["RUNBOOK_REDIS_CERT_FILE"], env["RUNBOOK_REDIS_KEY_FILE"]
        line = assert_failed(run_agent(env), "SourceUnavailable", *secrets)
        assert line.startswith(f"backup failed: SourceUnavailable: {message}"), line
        assert_nothing_stored(s3_server, bucket)


def test_the_manifest_is_signed_with_the_namespaces_key(
    postgres: Postgres, small_database: str, s3_server: S3Server, gpg_keyring: GpgKeyring, bucket: str
) -> None:
    """With RUNBOOK_MANIFEST_KEY the manifest carries an HMAC-SHA256 signature of its other fields; without it,
    none (unsigned manifests are refused wherever the key is given)."""
    key = "3e7a" * 16
    spec = policy_spec(pg_source(postgres, small_database), s3_server, bucket)
    result = run_agent(agent_env(spec, s3_server, gpg_keyring, **pg_env(), **{MANIFEST_KEY_ENV: key}))
    assert result.returncode == 0, result.stderr
    assert key not in result.stdout + result.stderr
    manifest = manifest_of(s3_server, bucket)
    assert manifest_signed(manifest, key) and not manifest_signed(manifest, "another key")
    assert not manifest_signed({**manifest, "data": {**manifest["data"], "sha256": "0" * 64}}, key)

    unsigned_bucket = new_bucket(s3_server)
    spec = policy_spec(pg_source(postgres, small_database), s3_server, unsigned_bucket)
    result = run_agent(agent_env(spec, s3_server, gpg_keyring, **pg_env()))
    assert result.returncode == 0, result.stderr
    assert "signature" not in manifest_of(s3_server, unsigned_bucket)
