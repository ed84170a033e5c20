"""Running the backup agent as a process, as its CronJob pod would, and reading what it left in S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

from runbook_operator.models.plans import GPG_PASSPHRASE_ENV, GPG_RECIPIENTS_ENV, JOB_NAME_ENV, SPEC_ENV
from tests.services import GpgKeyring, S3Server

AGENT = [sys.executable, "-m", "runbook_operator.cli", "backup"]


def new_bucket(s3: S3Server) -> str:
    name = f"backups-{uuid.uuid4().hex[:10]}"
    s3.client().create_bucket(Bucket=name)
    return name


def postgresql_source(host: str, port: int, database: str) -> dict[str, Any]:
    """A PostgreSQL source without TLS (the test servers have none), its credentials in ``db-credentials``."""
    return {
        "postgresql": {
            "host": host,
            "port": port,
            "database": database,
            "credentialsSecretRef": {"name": "db-credentials"},
            "insecurePlaintext": True,
        }
    }


def policy_spec(source: dict[str, Any], s3: S3Server, bucket: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "source": source,
        "schedule": "0 */6 * * *",
        "destination": {
            "s3": {
                "bucket": bucket,
                "prefix": "backups",
                "endpoint": s3.endpoint,
                "credentialsSecretRef": {"name": "backup-s3-credentials"},
                "serverSideEncryption": "None",
            }
        },
        "encryption": {"gpg": {"recipientsConfigMapRef": {"name": "backup-gpg-recipients", "key": "team.asc"}}},
    }
    spec.update(overrides)
    return spec


def agent_env(spec: dict[str, Any], s3: S3Server, keyring: GpgKeyring | None, **extra: str) -> dict[str, str]:
    """The environment the CronJob's pod spec gives the agent."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "AWS_", "REDISCLI", "RUNBOOK_"))}
    env.update(
        {
            SPEC_ENV: json.dumps(spec),
            JOB_NAME_ENV: "test-job",
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        }
    )
    if keyring is not None and GPG_PASSPHRASE_ENV not in extra:
        env[GPG_RECIPIENTS_ENV] = keyring.public_key
    env.update(extra)
    return env


def start_agent(
    env: dict[str, str], *, namespace: str = "hungryhippaahneties", policy: str = "db"
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*AGENT, "--namespace", namespace, "--policy", policy, "--generation", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_agent(env: dict[str, str], **kwargs: str) -> subprocess.CompletedProcess[str]:
    process = start_agent(env, **kwargs)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def bucket_keys(s3: S3Server, bucket: str) -> list[str]:
    response = s3.client().list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in response.get("Contents", []))


def pending_uploads(s3: S3Server, bucket: str) -> list[str]:
    response = s3.client().list_multipart_uploads(Bucket=bucket)
    return [upload["Key"] for upload in response.get("Uploads", [])]


def manifest_of(s3: S3Server, bucket: str) -> dict[str, Any]:
    keys = [k for k in bucket_keys(s3, bucket) if k.endswith("/manifest.json")]
    assert len(keys) == 1, keys
    document: dict[str, Any] = json.loads(s3.client().get_object(Bucket=bucket, Key=keys[0])["Body"].read())
    return document
