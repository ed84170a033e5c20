"""A PostgreSQL database owned by an application role, backed up by the BackupPolicy agent, and the restore
agent run as a process with the environment its Job's pod gets (``Kubelet``: the kubelet's part for the Jobs'
pods on a cluster whose nodes run none)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kubernetes

from runbook_operator.builders.restore import build_plan
from runbook_operator.models.backup import BackupPolicySpec, RestoreRoles
from runbook_operator.models.plans import GPG_PRIVATE_KEY_ENV, MANIFEST_KEY_ENV, RESTORE_PLAN_ENV
from runbook_operator.models.sources import PostgresConnection
from tests.backup_support import agent_env, manifest_of, new_bucket, policy_spec, run_agent
from tests.services import GpgKeyring, Postgres, S3Server

OWNER = "shop_owner"
OWNER_PASSWORD = "shop-owner-pw-7f3a"
TABLES = ("public.customers", "public.orders")
# The test namespaces' manifest signing key (Secret runbook-manifest-key): backups made by the agent in the
# tests are signed with it (``**SIGNED`` in their environment), as the CronJob's pods sign theirs.
MANIFEST_KEY = "9c4d2f0e1b7a4c3d8e5f6a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f70819"
SIGNED = {MANIFEST_KEY_ENV: MANIFEST_KEY}


def create_shop(postgres: Postgres) -> str:
    """A database owned by ``shop_owner`` with two related tables."""
    name = f"shop_{uuid.uuid4().hex[:8]}"
    with postgres.connect() as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (OWNER,)).fetchone() is None:
            conn.execute(f"CREATE ROLE {OWNER} LOGIN PASSWORD '{OWNER_PASSWORD}'")
        conn.execute(f"CREATE DATABASE {name} OWNER {OWNER}")
    with postgres.connect(name, user=OWNER, password=OWNER_PASSWORD) as conn:
        conn.execute("CREATE TABLE customers (id int PRIMARY KEY, email text NOT NULL)")
        conn.execute("INSERT INTO customers SELECT g, 'c' || g || '@example.com' FROM generate_series(1, 3000) g")
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers, amount int)")
        conn.execute("INSERT INTO orders SELECT g, 1 + g % 3000, g % 97 FROM generate_series(1, 12000) g")
    return name


def create_empty_database(postgres: Postgres, prefix: str = "scratch") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with postgres.connect() as conn:
        conn.execute(f"CREATE DATABASE {name} OWNER {OWNER}")
    return name


def fingerprint(postgres: Postgres, database: str) -> dict[str, Any]:
    """Row counts and a content hash of both tables (None for a missing table)."""
    result: dict[str, Any] = {}
    with postgres.connect(database) as conn:
        for table in TABLES:
            if conn.execute("SELECT to_regclass(%s) IS NULL", (table,)).fetchone() == (True,):
                result[table] = None
                continue
            result[table] = conn.execute(
                f"SELECT count(*), md5(coalesce(string_agg(md5(t::text), '' ORDER BY id), '')) FROM {table} t"
            ).fetchone()
    return result


def damage(postgres: Postgres, database: str) -> None:
    """What an incident leaves behind: deleted and changed rows."""
    with postgres.connect(database, user=OWNER, password=OWNER_PASSWORD) as conn:
        conn.execute("DELETE FROM orders WHERE id > 100")
        conn.execute("UPDATE customers SET email = 'pwned@example.com'")


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


@dataclass
class Backup:
    bucket: str
    spec: dict[str, Any]
    manifest: dict[str, Any]


def make_backup(
    postgres: Postgres,
    database: str,
    s3: S3Server,
    keyring: GpgKeyring,
    *,
    namespace: str = "hungryhippaahneties",
    policy: str = "db",
    **extra: str,
) -> Backup:
    """One backup by the BackupPolicy agent (as its CronJob pod runs it), encrypted to the keyring's key;
    ``extra``: more of the pod's environment (e.g. the manifest signing key)."""
    bucket = new_bucket(s3)
    spec = policy_spec(pg_source(postgres, database), s3, bucket)
    env = agent_env(spec, s3, keyring, PGUSER=OWNER, PGPASSWORD=OWNER_PASSWORD, **extra)
    result = run_agent(env, namespace=namespace, policy=policy)
    assert result.returncode == 0, result.stderr
    return Backup(bucket, spec, manifest_of(s3, bucket))


def plan_for(backup: Backup, target: dict[str, Any], roles: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plan the operator gives the restore Job for this backup (the builder's own), as JSON."""
    plan = build_plan(
        BackupPolicySpec.model_validate(backup.spec),
        backup.manifest,
        PostgresConnection.model_validate(target),
        roles=RestoreRoles.model_validate(roles or {}),
    )
    return plan.to_api()


def private_key(keyring: GpgKeyring) -> str:
    return keyring.run("--armor", "--export-secret-keys", keyring.email).stdout.decode()


def restore_env(plan: dict[str, Any], s3: S3Server, key: str, **extra: str) -> dict[str, str]:
    """The environment the restore Job's pod gets: plan, target login, S3 keys, private key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "AWS_", "RUNBOOK_"))}
    env.update(
        {
            RESTORE_PLAN_ENV: json.dumps(plan),
            "PGUSER": OWNER,
            "PGPASSWORD": OWNER_PASSWORD,
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            GPG_PRIVATE_KEY_ENV: key,
        }
    )
    env.update(extra)
    return env


def run_restore_agent(command: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runbook_operator.cli", command, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def tamper(s3: S3Server, bucket: str, key: str, offset: int | None = None) -> None:
    """Change one byte of the stored object (in the middle by default), keeping its size."""
    client = s3.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    index = len(data) // 2 if offset is None else offset
    data[index] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))


def database_text(postgres: Postgres, database: str) -> str:
    """The whole database as pg_dump prints it (schema, rows, large objects, owners, privileges): equal text
    is an unchanged database. The random ``\\restrict`` key lines are left out."""
    dump = subprocess.run(
        ["pg_dump", "--no-password", "--dbname", postgres.dsn(database)], capture_output=True, text=True, check=True
    ).stdout
    return "\n".join(line for line in dump.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


def swap_object(s3: S3Server, backup: Backup, other: Backup, padding: int) -> None:
    """What a bucket writer can do: store another backup's data object (a valid archive) under this backup's
    key, with ``padding`` zero bytes after it."""
    client = s3.client()
    archive = client.get_object(Bucket=other.bucket, Key=other.manifest["data"]["key"])["Body"].read()
    client.put_object(Bucket=backup.bucket, Key=backup.manifest["data"]["key"], Body=archive + bytes(padding))


class Kubelet:
    """The kubelet's part for one namespace's Job pods (the test cluster's nodes are kwok: no pod runs): a pod's
    container run as a process with the environment the kubelet would give it, its exit then reported in the
    pod's status (exit code, termination message), from which the Job controller finishes the Job."""

    def __init__(self, core: kubernetes.client.CoreV1Api, namespace: str, wait_for: Callable[..., Any]) -> None:
        self.core, self.namespace, self.wait_for = core, namespace, wait_for

    def job_pod(self, job: str) -> Any:
        def found() -> Any:
            pods = self.core.list_namespaced_pod(
                self.namespace, label_selector=f"batch.kubernetes.io/job-name={job}"
            ).items
            return pods[0] if pods else None

        return self.wait_for(found, timeout=60, what=f"the pod of Job {job}")

    def pod_env(self, container: Any, job: str) -> dict[str, str]:
        """What the kubelet puts in the container's environment: values, Secret and ConfigMap keys as they are
        now, and the Job's name (the pod's label)."""
        env: dict[str, str] = {}
        for item in container.env or []:
            source = item.value_from
            if source is None:
                env[item.name] = item.value
            elif source.field_ref is not None:
                assert source.field_ref.field_path == "metadata.labels['batch.kubernetes.io/job-name']", item
                env[item.name] = job
            elif source.secret_key_ref is not None:
                ref = source.secret_key_ref
                data = self.core.read_namespaced_secret(ref.name, self.namespace).data
                env[item.name] = base64.b64decode(data[ref.key]).decode()
            else:
                ref = source.config_map_key_ref
                env[item.name] = self.core.read_namespaced_config_map(ref.name, self.namespace).data[ref.key]
        return env

    def run_container(self, container: Any, job: str, **env_overrides: str) -> subprocess.CompletedProcess[str]:
        """The container's command (the agent's CLI with its args) as a process, in the pod's environment."""
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG")}
        return subprocess.run(
            [sys.executable, "-m", "runbook_operator.cli", *container.args],
            env={**base, **self.pod_env(container, job), **env_overrides},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    def run_job_pod(self, job: str, **env_overrides: str) -> subprocess.CompletedProcess[str]:
        """Run the Job's container as a process, then report its exit as the kubelet would."""
        return self.run_pod(self.job_pod(job), **env_overrides)

    @contextlib.contextmanager
    def verify_pods(self) -> Iterator[list[subprocess.CompletedProcess[str]]]:
        """The kubelet's part for the restore preflight's verify Jobs: each one's pod run once as it appears;
        yields the runs so far."""
        runs: list[subprocess.CompletedProcess[str]] = []
        done: set[str] = set()
        stop = threading.Event()

        def kubelet() -> None:
            while not stop.wait(0.3):
                pods = self.core.list_namespaced_pod(
                    self.namespace, label_selector="app.kubernetes.io/component=restore-verify"
                ).items
                for pod in pods:
                    if pod.metadata.uid not in done:
                        done.add(pod.metadata.uid)
                        runs.append(self.run_pod(pod))

        thread = threading.Thread(target=kubelet, daemon=True)
        thread.start()
        try:
            yield runs
        finally:
            stop.set()
            thread.join(60)

    def run_pod(self, pod: Any, **env_overrides: str) -> subprocess.CompletedProcess[str]:
        """The pod's container as a process, its exit then reported as the kubelet would."""
        container = pod.spec.containers[0]
        job = (pod.metadata.labels or {}).get("batch.kubernetes.io/job-name", "")
        result = self.run_container(container, job, **env_overrides)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        lines = (result.stderr if result.returncode else result.stdout).strip().splitlines()
        terminated = {
            "exitCode": result.returncode,
            "reason": "Completed" if result.returncode == 0 else "Error",
            "message": lines[-1] if lines else "",
            "startedAt": now,
            "finishedAt": now,
        }
        status = {
            "phase": "Succeeded" if result.returncode == 0 else "Failed",
            "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now}],
            "containerStatuses": [
                {
                    "name": container.name,
                    "image": container.image,
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "started": False,
                    "state": {"running": None, "terminated": terminated},
                }
            ],
        }
        self.core.patch_namespaced_pod_status(pod.metadata.name, self.namespace, {"status": status})
        return result
