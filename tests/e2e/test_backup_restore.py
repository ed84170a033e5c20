"""A BackupPolicy's CronJob runs the agent in its image on the real node, and a BackupRestore's Job restores it.

The backup: ``runbook.dev/backup-now`` starts one Job from the CronJob's template; its pod runs the operator's
image (read-only root, uid 10001) against the PostgreSQL pod and uploads to the S3 server pod. The test then
restores it by hand (download, sha256, ``gpg --decrypt``, ``pg_restore`` into a fresh database) and compares
the rows. The restore (the module's second test, on the first one's backup): the data changed meanwhile comes
back, and api (2 replicas) and backend (1) are really scaled to zero pods and back to exactly 2 and 1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.e2e.support import BACKUP_BUCKET, E2E, NAMESPACE, S3_ENDPOINT, image_tool, s3_client
from tests.services import GpgKeyring

pytestmark = pytest.mark.integration

POLICY = "postgresql"
DATABASE = "hungryhippaahneties_db"


def secret_value(e2e: E2E, name: str, key: str) -> str:
    return base64.b64decode(e2e.core.read_namespaced_secret(name, NAMESPACE).data[key]).decode()


def postgres_ip(e2e: E2E) -> str:
    (pod,) = e2e.ready_pods("app=postgresql")
    return str(pod.status.pod_ip)


def connect(e2e: E2E, database: str = DATABASE, *, admin: bool = False) -> psycopg.Connection[Any]:
    """A connection from the host to the PostgreSQL pod, as the application's login or the superuser."""
    secret = "postgres-admin" if admin else "db-credentials"
    return psycopg.connect(
        host=postgres_ip(e2e),
        port=5432,
        dbname=database,
        user=secret_value(e2e, secret, "POSTGRES_USER"),
        password=secret_value(e2e, secret, "POSTGRES_PASSWORD"),
        autocommit=True,
        connect_timeout=10,
    )


def notes(e2e: E2E, database: str = DATABASE) -> list[tuple[Any, ...]]:
    with connect(e2e, database, admin=True) as conn:
        return conn.execute("SELECT id, body FROM notes ORDER BY id").fetchall()


@pytest.fixture(scope="module")
def backup(e2e: E2E) -> dict[str, Any]:
    """The policy's backup of 2,000 rows, started by backup-now: the manifest, and the rows backed up."""
    with connect(e2e) as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL)")
        conn.execute("INSERT INTO notes SELECT g, md5(g::text) FROM generate_series(1, 2000) g")
    e2e.create_custom(
        "backuppolicies",
        {
            "kind": "BackupPolicy",
            "metadata": {"name": POLICY},
            "spec": {
                "source": {
                    "postgresql": {
                        "host": f"postgresql.{NAMESPACE}.svc",
                        "port": 5432,
                        "database": DATABASE,
                        "insecurePlaintext": True,
                        "credentialsSecretRef": {
                            "name": "db-credentials",
                            "usernameKey": "POSTGRES_USER",
                            "passwordKey": "POSTGRES_PASSWORD",
                        },
                    }
                },
                "schedule": "0 */6 * * *",
                "timeZone": "UTC",
                "destination": {
                    "s3": {
                        "bucket": BACKUP_BUCKET,
                        "prefix": "postgresql",
                        "region": "us-east-1",
                        "endpoint": S3_ENDPOINT,
                        "credentialsSecretRef": {"name": "backup-s3-credentials"},
                        "serverSideEncryption": "AES256",
                    }
                },
                "encryption": {
                    "gpg": {"recipientsConfigMapRef": {"name": "backup-gpg-recipients", "key": "security-team.asc"}}
                },
                "retention": {"maxAge": "7y", "minKeep": 28},
            },
        },
    )
    e2e.wait(
        lambda: (c := e2e.condition("backuppolicies", POLICY, "Ready")) and c["status"] == "True",
        timeout=120,
        what="the BackupPolicy Ready",
    )
    cronjob = e2e.batch.read_namespaced_cron_job(f"backup-{POLICY}", NAMESPACE)
    e2e.must("-n", NAMESPACE, "annotate", "backuppolicy", POLICY, f"runbook.dev/backup-now={time.time_ns()}")

    def finished_job() -> Any:
        jobs = e2e.batch.list_namespaced_job(NAMESPACE).items
        done = [j for j in jobs if j.metadata.name.startswith(f"backup-{POLICY}-now-") and j.status.completion_time]
        failed = [j for j in jobs if j.metadata.name.startswith(f"backup-{POLICY}-now-") and j.status.failed]
        assert not failed, e2e.diagnostics()
        return done[0] if done else None

    job = e2e.wait(finished_job, timeout=300, what="the backup-now Job to succeed")
    (pod,) = e2e.core.list_namespaced_pod(NAMESPACE, label_selector=f"job-name={job.metadata.name}").items
    keys = [o["Key"] for o in s3_client(e2e).list_objects_v2(Bucket=BACKUP_BUCKET).get("Contents", [])]
    manifests = [k for k in keys if k.startswith(f"{POLICY}/") and k.endswith("/manifest.json")]
    assert len(manifests) == 1, keys
    manifest = json.loads(s3_client(e2e).get_object(Bucket=BACKUP_BUCKET, Key=manifests[0])["Body"].read())
    return {"manifest": manifest, "rows": notes(e2e), "pod": pod, "cronjob": cronjob, "job": job}


def test_a_backup_now_job_runs_the_agent_in_its_image_and_a_restore_by_hand_matches(
    e2e: E2E, backup: dict[str, Any], gpg_keyring: GpgKeyring, tmp_path: Path
) -> None:
    pod, manifest = backup["pod"], backup["manifest"]
    assert pod.spec.node_name == "real-node"
    (container,) = pod.status.container_statuses
    assert container.image.endswith(image_tool.operator_image().split("/", 1)[1]), container.image
    assert container.state.terminated.exit_code == 0 and container.container_id.startswith("containerd://")
    template = backup["cronjob"].spec.job_template.spec.template.spec
    assert pod.spec.containers[0].image == template.containers[0].image
    assert pod.spec.containers[0].security_context.read_only_root_filesystem is True
    assert manifest["job"] == backup["job"].metadata.name
    assert manifest["source"]["tool"].startswith("pg_dump (PostgreSQL) 15"), manifest["source"]
    assert manifest["source"]["tableRowCounts"] == {"public.notes": 2000}

    # By hand: download, check the digest, gpg --decrypt, pg_restore into a fresh database on the same server.
    data = s3_client(e2e).get_object(Bucket=BACKUP_BUCKET, Key=manifest["data"]["key"])["Body"].read()
    assert hashlib.sha256(data).hexdigest() == manifest["data"]["sha256"]
    dump = tmp_path / "backup.dump"
    dump.write_bytes(gpg_keyring.decrypt(data))
    with connect(e2e, admin=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS restored_by_hand")
        conn.execute("CREATE DATABASE restored_by_hand")
    restore = ["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error", "-h", postgres_ip(e2e)]
    restored = subprocess.run(
        [*restore, "-U", "postgres", "-d", "restored_by_hand", str(dump)],
        env={**os.environ, "PGPASSWORD": secret_value(e2e, "postgres-admin", "POSTGRES_PASSWORD")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert restored.returncode == 0, restored.stderr
    assert notes(e2e, "restored_by_hand") == backup["rows"]
    assert len(backup["rows"]) == 2000


class ScaleWatch(threading.Thread):
    """Records, every half second, the ready pods of api and backend, until stopped."""

    def __init__(self, e2e: E2E) -> None:
        super().__init__(daemon=True)
        self.e2e = e2e
        self.seen: list[tuple[int, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.seen.append((len(self.e2e.ready_pods("app=api")), len(self.e2e.ready_pods("app=backend"))))
            time.sleep(0.5)


def test_a_backup_restore_job_restores_it_with_the_apps_really_scaled_down_and_back(
    e2e: E2E, backup: dict[str, Any]
) -> None:
    with connect(e2e) as conn:  # what the restore must undo
        conn.execute("DELETE FROM notes WHERE id > 1000")
        conn.execute("UPDATE notes SET body = 'tampered' WHERE id <= 10")
    assert notes(e2e) != backup["rows"]
    assert [e2e.apps.read_namespaced_deployment(n, NAMESPACE).spec.replicas for n in ("api", "backend")] == [2, 1]

    watch = ScaleWatch(e2e)
    watch.start()
    e2e.create_custom(
        "backuprestores",
        {
            "kind": "BackupRestore",
            "metadata": {"name": "restore-latest"},
            "spec": {
                "policyRef": POLICY,
                "backup": "latest",
                "decryptionSecretRef": {"name": "restore-gpg-private-key", "key": "security-team-private.asc"},
                "scaleDown": [{"kind": "Deployment", "name": "api"}, {"kind": "Deployment", "name": "backend"}],
            },
        },
    )
    try:
        status = e2e.wait(
            lambda: (
                (s := e2e.custom_object("backuprestores", "restore-latest").get("status") or {}).get("phase")
                in ("Succeeded", "Failed")
                and s
            ),
            timeout=400,
            what="the BackupRestore to finish",
        )
        assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
        e2e.wait(
            lambda: (len(e2e.ready_pods("app=api")), len(e2e.ready_pods("app=backend"))) == (2, 1),
            timeout=180,
            what="api and backend back to 2 and 1 ready pods",
        )
    finally:
        watch.done.set()
        watch.join()
    assert (0, 0) in watch.seen, watch.seen  # both really stopped meanwhile, not only their spec
    assert [e2e.apps.read_namespaced_deployment(n, NAMESPACE).spec.replicas for n in ("api", "backend")] == [2, 1]
    assert notes(e2e) == backup["rows"]
    restore_pods = [
        p
        for p in e2e.core.list_namespaced_pod(NAMESPACE).items
        if (p.metadata.labels or {}).get("job-name", "").startswith("restore-")
    ]
    assert restore_pods and all(p.spec.node_name == "real-node" for p in restore_pods), restore_pods
