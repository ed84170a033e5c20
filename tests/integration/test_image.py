"""The project's image, built from the repository's Dockerfile by tools/image/image.py (cached), runs the agent
under the constraints its pods set: read-only root filesystem, uid 10001, a 16 MiB /tmp.

A Docker daemon that cannot start, a base that cannot be built, or a build that fails makes these tests fail
(ImageError), never skip. The containers use the host's network, so they reach the session's PostgreSQL and
S3 API server on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import psycopg
import pytest
import redis
from tests.backup_support import bucket_keys, manifest_of, new_bucket, policy_spec, postgresql_source
from tests.services import GpgKeyring, Postgres, S3Server, free_port, wait_port

from runbook_operator.models.plans import GPG_RECIPIENTS_ENV, JOB_NAME_ENV, SPEC_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tools" / "image"))

import image as image_tool  # noqa: E402 - found through the sys.path entry above

pytestmark = pytest.mark.integration

# What the CronJob's and Job's pod specs set (builders): the tests run the container the same way.
POD_CONSTRAINTS = ["--read-only", "--user", "10001", "--tmpfs", "/tmp:size=16m"]


@pytest.fixture(scope="module")
def image_archive() -> Path:
    """The operator image built (or found current) by image.py, once per module: its docker-archive."""
    return image_tool.build_operator()


@pytest.fixture(scope="module")
def image(image_archive: Path) -> str:
    """The operator image's name."""
    return image_tool.operator_image()


def docker_run(image: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``docker run`` of the image under the pod's constraints; ``env`` values reach the container through the
    docker client's environment (``-e NAME``), never its command line."""
    names = [arg for name in (env or {}) for arg in ("-e", name)]
    return subprocess.run(
        [image_tool.docker_cli(), "run", "--rm", "--network", "host", *POD_CONSTRAINTS, *names, image, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_the_operator_cli_runs_read_only_as_uid_10001(image: str) -> None:
    result = docker_run(image, "--help")
    assert result.returncode == 0, result.stderr
    for command in ("run", "backup", "restore", "verify"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.M), result.stdout
    config = json.loads(image_tool.docker("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["User"] == "10001:10001"  # the image's own user is the pods' runAsUser
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "runbook-operator"]


def test_the_images_pg_dump_is_at_least_the_servers_major(image: str, postgres: Postgres) -> None:
    """pg_dump refuses a newer server: the image's client major must be >= the server's."""
    result = subprocess.run(
        [image_tool.docker_cli(), "run", "--rm", *POD_CONSTRAINTS, "--entrypoint", "pg_dump", image, "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    client_major = int(re.search(r"\(PostgreSQL\) (\d+)", result.stdout).group(1))  # type: ignore[union-attr]
    with postgres.connect() as conn:
        row = conn.execute("SHOW server_version_num").fetchone()
    assert row is not None
    server_major = int(row[0]) // 10000
    assert client_major >= server_major >= 15, (client_major, server_major)


def test_a_backup_run_by_the_agent_in_its_image(
    image: str, postgres: Postgres, s3_server: S3Server, gpg_keyring: GpgKeyring, tmp_path: Path
) -> None:
    database = f"image_{uuid.uuid4().hex[:6]}"
    with postgres.connect() as conn:
        conn.execute(f"CREATE DATABASE {database}")
    with postgres.connect(database) as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO notes SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
    bucket = new_bucket(s3_server)
    spec = policy_spec(postgresql_source(postgres.host, postgres.port, database), s3_server, bucket)
    env = {
        SPEC_ENV: json.dumps(spec),
        JOB_NAME_ENV: "image-test-job",
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        GPG_RECIPIENTS_ENV: gpg_keyring.public_key,
        "PGUSER": postgres.superuser,
        "PGPASSWORD": postgres.password,
    }
    result = docker_run(
        image, "backup", "--namespace", "hungryhippaahneties", "--policy", "db", "--generation", "1", env=env
    )
    assert result.returncode == 0, result.stderr
    assert postgres.password not in result.stdout + result.stderr

    manifest = manifest_of(s3_server, bucket)
    assert manifest["job"] == "image-test-job"
    assert manifest["source"]["tool"].startswith("pg_dump (PostgreSQL) 15"), manifest["source"]
    assert manifest["source"]["tableRowCounts"] == {"public.notes": 5000}
    data_key = manifest["data"]["key"]
    assert data_key in bucket_keys(s3_server, bucket)

    # Restored by hand with the host's stock tools: gpg --decrypt, then pg_restore into a fresh database.
    encrypted = s3_server.client().get_object(Bucket=bucket, Key=data_key)["Body"].read()
    dump = tmp_path / "backup.dump"
    dump.write_bytes(gpg_keyring.decrypt(encrypted))
    dump.chmod(0o644)
    tmp_path.chmod(0o755)
    fresh = f"restored_{uuid.uuid4().hex[:6]}"
    with postgres.connect() as conn:
        conn.execute(f"CREATE DATABASE {fresh}")
    subprocess.run(
        [
            *("pg_restore", "--no-owner", "--exit-on-error", "-h", postgres.host, "-p", str(postgres.port)),
            *("-U", postgres.superuser, "-d", fresh, str(dump)),
        ],
        env={**os.environ, "PGPASSWORD": postgres.password},
        check=True,
        capture_output=True,
    )
    digest = "SELECT count(*), md5(string_agg(body, ',' ORDER BY id)) FROM notes"
    with postgres.connect(database) as source, postgres.connect(fresh) as restored:
        assert restored.execute(digest).fetchone() == source.execute(digest).fetchone()


def certificates(bundle: bytes) -> set[bytes]:
    return set(re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", bundle, re.S))


def test_the_build_ca_bundle_is_not_in_the_image(image_archive: Path) -> None:
    """The machine's CA bundle reached the build as a secret only: none of the certificates this machine adds
    to Debian's (the local ones, e.g. a TLS-inspecting proxy's, that pip needs here) is in any file of any
    layer of the exported image."""
    bundle = image_tool.ca_bundle()
    assert bundle is not None, "no CA bundle configured for pip on this machine"
    debian = b"".join(path.read_bytes() for path in Path("/usr/share/ca-certificates").rglob("*.crt"))
    added = certificates(bundle.read_bytes()) - certificates(debian)
    found: list[str] = []
    with tarfile.open(image_archive) as outer:
        layers = json.load(outer.extractfile("manifest.json"))[0]["Layers"]  # type: ignore[arg-type]
        for layer in layers:
            with tarfile.open(fileobj=io.BytesIO(outer.extractfile(layer).read())) as inner:  # type: ignore[union-attr]
                for member in inner:
                    if member.isfile():
                        content = inner.extractfile(member).read()  # type: ignore[union-attr]
                        found += [member.name for line in added if line in content]
    assert found == []


@pytest.fixture(scope="module")
def e2e_images() -> dict[str, Path]:
    return image_tool.build_e2e()


def start_server(image: str, *args: str, tmpfs: str, env: dict[str, str]) -> str:
    """A detached container of an e2e image, read-only but for one tmpfs, as its non-root image user (the caller
    removes it, after reading its log if it failed)."""
    names = [arg for name in env for arg in ("-e", name)]
    command = [image_tool.docker_cli(), "run", "-d", "--network", "host", "--read-only", "--tmpfs", tmpfs]
    result = subprocess.run(
        [*command, *names, image, *args], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_the_e2e_server_images_serve_read_only_as_non_root(e2e_images: dict[str, Path]) -> None:
    """The e2e tier's PostgreSQL, Redis and S3 API server images, each exported for `ctr images import`."""
    assert sorted(e2e_images) == [
        "runbook-e2e/postgres:bookworm",
        "runbook-e2e/redis:bookworm",
        "runbook-e2e/s3:bookworm",
    ]
    for name, archive in e2e_images.items():
        with tarfile.open(archive) as tar:  # a docker-archive naming the image
            assert json.load(tar.extractfile("manifest.json"))[0]["RepoTags"] == [name]  # type: ignore[arg-type]
    pg_port, redis_port, s3_port = free_port(), free_port(), free_port()
    containers = [
        start_server(
            "runbook-e2e/postgres:bookworm",
            *("-c", f"port={pg_port}"),
            tmpfs="/var/lib/postgresql:uid=999,gid=999",
            env={"POSTGRES_PASSWORD": "e2e-pg-pw", "POSTGRES_DB": "shop"},
        ),
        start_server(
            "runbook-e2e/redis:bookworm",
            "--port",
            str(redis_port),
            tmpfs="/data:uid=999",
            env={"REDIS_PASSWORD": "e2e-r"},
        ),
        start_server("runbook-e2e/s3:bookworm", "-p", str(s3_port), tmpfs="/tmp", env={}),
    ]
    try:
        for container, port in zip(containers, (pg_port, redis_port, s3_port), strict=True):
            try:
                wait_port(port, timeout=60)
            except TimeoutError as error:
                logs = subprocess.run(
                    [image_tool.docker_cli(), "logs", container], capture_output=True, text=True, check=False
                )
                raise AssertionError(f"{error}; the container's log:\n{logs.stdout}{logs.stderr}") from error
        dsn = f"host=127.0.0.1 port={pg_port} dbname=shop user=postgres password=e2e-pg-pw"
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT current_user, current_setting('server_version_num')::int / 10000").fetchone()
        assert row == ("postgres", 15)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(dsn.replace("e2e-pg-pw", "wrong")).close()
        assert redis.Redis(port=redis_port, password="e2e-r").ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=redis_port).get("k")
        s3 = S3Server()
        s3.port, s3.endpoint = s3_port, f"http://127.0.0.1:{s3_port}"
        bucket = new_bucket(s3)
        s3.client().put_object(Bucket=bucket, Key="k", Body=b"stored")
        assert s3.client().get_object(Bucket=bucket, Key="k")["Body"].read() == b"stored"
    finally:
        subprocess.run([image_tool.docker_cli(), "rm", "-f", *containers], capture_output=True, check=False)
