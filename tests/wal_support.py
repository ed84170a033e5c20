"""WAL archives for tests: signed manifests written straight into the bucket (catalog tests), the receiver and
base-backup agents run as processes with their pod's environment (archive and restore tests), and reading back
what they shipped.

Other suites may import: ``SIGNING_KEY``, ``wal_location``, ``put_segment``, ``put_history``, ``put_base_backup``,
``wal_policy_spec``, ``wal_env``, ``start_receiver``, ``stop_receiver``, ``run_base_backup``, ``replication_role``,
``wait_shipped``, ``fetch_plain``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from runbook_operator.models.plans import (
    GPG_PASSPHRASE_ENV,
    JOB_NAME_ENV,
    MANIFEST_KEY_ENV,
    PG_PASSWORD_ENV,
    PG_USER_ENV,
    SIGNATURE,
    WAL_SCRATCH_ENV,
    WAL_SEGMENT_BYTES,
    WAL_SPEC_ENV,
    format_lsn,
    format_timestamp,
    policy_folder,
    segment_name,
    sign_manifest,
)
from runbook_operator.models.sources import S3Location
from runbook_operator.reconcilers import wal_catalog
from tests.backup_support import policy_spec, postgresql_source
from tests.services import GpgKeyring, Postgres, S3Server

SIGNING_KEY = "test-namespace-manifest-key"
NAMESPACE, POLICY = "hungryhippaahneties", "db"
CLI = [sys.executable, "-m", "runbook_operator.cli"]
REPLICATION_USER, REPLICATION_PASSWORD = "archiver", "archiver-test-pw"


def wal_location(s3: S3Server, bucket: str, prefix: str = "backups") -> S3Location:
    return S3Location(bucket=bucket, prefix=prefix, endpoint=s3.endpoint, server_side_encryption="None")


def base_of(location: S3Location, namespace: str = NAMESPACE, policy: str = POLICY) -> str:
    return policy_folder(location, namespace, policy)


def signed(document: dict[str, Any], key: str | None = SIGNING_KEY) -> dict[str, Any]:
    if key is not None:
        document[SIGNATURE] = sign_manifest(document, key)
    return document


def _put(client: Any, location: S3Location, key: str, body: bytes) -> None:
    client.put_object(Bucket=location.bucket, Key=key, Body=body)


def put_segment(
    client: Any,
    location: S3Location,
    *,
    segno: int,
    shipped: datetime,
    timeline: int = 1,
    partial: bool = False,
    end: int | None = None,
    key: str | None = SIGNING_KEY,
    policy: tuple[str, str] = (NAMESPACE, POLICY),
    data: bool = True,
    segment_bytes: int = WAL_SEGMENT_BYTES,
) -> dict[str, Any]:
    """A segment's object (a few stand-in bytes) and its signed manifest; returns the manifest."""
    start = segno * segment_bytes
    name = segment_name(timeline, start, segment_bytes)
    data_key, manifest_key = wal_catalog.segment_keys(base_of(location), timeline, name, partial=partial)
    body = f"{name}{partial}{end}".encode()
    manifest = signed(
        {
            "policy": {"namespace": policy[0], "name": policy[1]},
            "name": name,
            "timeline": timeline,
            "partial": partial,
            "startLsn": format_lsn(start),
            "endLsn": format_lsn(end if end is not None else start + segment_bytes),
            "segmentBytes": segment_bytes,
            "sha256": hashlib.sha256(body).hexdigest(),
            "plainSha256": hashlib.sha256(body).hexdigest(),
            "sizeBytes": len(body),
            "shippedTime": wal_catalog.rfc3339(shipped),
            "symmetric": True,
        },
        key,
    )
    if data:
        _put(client, location, data_key, body)
    _put(client, location, manifest_key, json.dumps(manifest).encode())
    return manifest


def put_history(client: Any, location: S3Location, *, timeline: int, begin: int, shipped: datetime) -> dict[str, Any]:
    data_key, manifest_key = wal_catalog.history_keys(base_of(location), timeline)
    body = f"{timeline - 1}\t{format_lsn(begin)}\tno recovery target specified\n".encode()
    manifest = signed(
        {
            "policy": {"namespace": NAMESPACE, "name": POLICY},
            "name": f"{timeline:08X}.history",
            "timeline": timeline,
            "partial": False,
            "startLsn": format_lsn(begin),
            "endLsn": format_lsn(begin),
            "sha256": hashlib.sha256(body).hexdigest(),
            "plainSha256": hashlib.sha256(body).hexdigest(),
            "sizeBytes": len(body),
            "shippedTime": wal_catalog.rfc3339(shipped),
            "symmetric": True,
        }
    )
    _put(client, location, data_key, body)
    _put(client, location, manifest_key, json.dumps(manifest).encode())
    return manifest


def put_base_backup(
    client: Any,
    location: S3Location,
    *,
    start: int,
    stop: int,
    started: datetime,
    stopped: datetime,
    timeline: int = 1,
    key: str | None = SIGNING_KEY,
) -> str:
    """A base backup's stand-in tar and signed manifest; returns its folder."""
    stamp = format_timestamp(started)
    data_key, manifest_key = wal_catalog.base_backup_keys(base_of(location), stamp)
    body = b"tar" + stamp.encode()
    manifest = signed(
        {
            "policy": {"namespace": NAMESPACE, "name": POLICY},
            "timeline": timeline,
            "startLsn": format_lsn(start),
            "stopLsn": format_lsn(stop),
            "startTime": wal_catalog.rfc3339(started),
            "stopTime": wal_catalog.rfc3339(stopped),
            "serverVersion": 150000,
            "sha256": hashlib.sha256(body).hexdigest(),
            "sizeBytes": len(body),
            "symmetric": True,
        },
        key,
    )
    _put(client, location, data_key, body)
    _put(client, location, manifest_key, json.dumps(manifest).encode())
    return data_key.rsplit("/", 1)[0] + "/"


# --- the agents as processes -------------------------------------------------------------------------------


def replication_role(server: Postgres, user: str = REPLICATION_USER, password: str = REPLICATION_PASSWORD) -> None:
    """A login with REPLICATION only (what spec.wal.replicationCredentialsSecretRef holds)."""
    with server.connect() as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)).fetchone() is None:
            conn.execute(f"CREATE ROLE {user} LOGIN REPLICATION PASSWORD '{password}'")


def create_slot(server: Postgres, slot: str) -> None:
    """What the operator does before it starts the receiver (reserve the WAL from now)."""
    with server.connect() as conn:
        if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone() is None:
            conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))


def wal_policy_spec(server: Postgres, s3: S3Server, bucket: str, **wal: Any) -> dict[str, Any]:
    spec = policy_spec(postgresql_source(server.host, server.port, "postgres"), s3, bucket)
    spec["encryption"] = {"gpg": {"passphraseSecretRef": {"name": "backup-gpg", "key": "passphrase"}}}
    spec["wal"] = {"replicationCredentialsSecretRef": {"name": "wal-replication"}, "shipIntervalSeconds": 1, **wal}
    return spec


PASSPHRASE = "wal-test-passphrase"


def wal_env(
    spec: dict[str, Any],
    s3: S3Server,
    scratch: Path,
    *,
    user: str = REPLICATION_USER,
    password: str = REPLICATION_PASSWORD,
    keyring: GpgKeyring | None = None,
    **extra: str,
) -> dict[str, str]:
    """The environment the receiver's Deployment / the base-backup CronJob give the agent."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "AWS_", "REDISCLI", "RUNBOOK_"))}
    env.update(
        {
            WAL_SPEC_ENV: json.dumps(spec),
            WAL_SCRATCH_ENV: str(scratch),
            JOB_NAME_ENV: "test-wal",
            PG_USER_ENV: user,
            PG_PASSWORD_ENV: password,
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            MANIFEST_KEY_ENV: SIGNING_KEY,
        }
    )
    if keyring is not None:
        env["RUNBOOK_GPG_RECIPIENTS"] = keyring.public_key
    else:
        env[GPG_PASSPHRASE_ENV] = PASSPHRASE
    env.update(extra)
    return env


def start_receiver(
    env: Mapping[str, str], log: Path, *, namespace: str = NAMESPACE, policy: str = POLICY
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [*CLI, "wal-receive", "--namespace", namespace, "--policy", policy],
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a SIGKILL of the group is the container's end
        )


def stop_receiver(process: subprocess.Popen[bytes], *, kill: bool = False, timeout: float = 60) -> int:
    """SIGTERM to the receiver (a pod's stop: PID 1 is told), or SIGKILL of its process group (the container's
    cgroup killed; the receiver streams in-process, the group holds it and its gpg children)."""
    if process.poll() is None:
        if kill:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.send_signal(signal.SIGTERM)
    code = process.wait(timeout)
    if kill:
        with contextlib.suppress(ProcessLookupError):  # what is left of the group
            os.killpg(process.pid, signal.SIGKILL)
    return code


def run_base_backup(
    env: Mapping[str, str], *, namespace: str = NAMESPACE, policy: str = POLICY, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "base-backup", "--namespace", namespace, "--policy", policy],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read(s3: S3Server, location: S3Location) -> wal_catalog.WALCatalog:
    from runbook_operator.clients.s3 import make_client

    client = make_client(location, s3.access_key, s3.secret_key)
    return wal_catalog.read_catalog(client, location, namespace=NAMESPACE, policy=POLICY, signing_key=SIGNING_KEY)


def wait_shipped(s3: S3Server, location: S3Location, lsn: int, timeout: float = 60) -> wal_catalog.WALCatalog:
    """The catalog once the bucket's WAL reaches ``lsn``."""
    deadline = time.monotonic() + timeout
    while True:
        catalog = read(s3, location)
        newest = catalog.latest()
        if newest is not None and newest[0] >= lsn:
            return catalog
        if time.monotonic() > deadline:
            raise TimeoutError(f"WAL through {format_lsn(lsn)} not shipped in {timeout} s (have {newest})")
        time.sleep(0.25)


def fetch_plain(s3: S3Server, location: S3Location, key: str, *, passphrase: str = PASSPHRASE) -> bytes:
    """An object decrypted with stock gpg (as a person restoring by hand would)."""
    body = s3.client().get_object(Bucket=location.bucket, Key=key)["Body"].read()
    done = subprocess.run(
        ["gpg", "--batch", "--quiet", "--pinentry-mode", "loopback", "--passphrase", passphrase, "--decrypt"],
        input=body,
        capture_output=True,
        check=True,
        env={**os.environ, "GNUPGHOME": str(_gpg_home())},
    )
    plain: bytes = done.stdout
    return plain


def _gpg_home() -> Path:
    home = Path("/tmp/runbook-wal-test-gpg")
    home.mkdir(mode=0o700, exist_ok=True)
    return home
