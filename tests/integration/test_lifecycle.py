"""The bucket lifecycle rule under concurrency, end to end: ten BackupPolicies with distinct prefixes sharing one
bucket, reconciled at once by the operator (real API server, real S3 API server), leave all ten rules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kopf.testing
import kubernetes
import pytest
from tests.backup_support import new_bucket, postgresql_source
from tests.integration.conftest import OPERATOR_ARGS, grant
from tests.services import S3Server, free_port

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "runbook.dev", "v1alpha1", "backuppolicies"
POLICIES = 10
DB_PORT = free_port()  # no database is reached by a reconcile; the tenancy rules want its host granted


def references(api: kubernetes.client.ApiClient, namespace: str, s3_server: S3Server) -> None:
    """The Secrets every policy names, and the grant of its (never contacted) database host."""
    core = kubernetes.client.CoreV1Api(api)
    s3_keys = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    for name, data in (
        ("db-credentials", {"username": "reader", "password": "reader-password"}),
        ("backup-s3-credentials", s3_keys),
        ("backup-passphrase", {"passphrase": "a long enough passphrase"}),
    ):
        core.create_namespaced_secret(namespace, {"metadata": {"name": name}, "stringData": data})
    grant(api, namespace, hosts=[("127.0.0.1", DB_PORT)])


def policy_spec(endpoint: str, bucket: str, prefix: str) -> dict[str, Any]:
    return {
        "source": postgresql_source("127.0.0.1", DB_PORT, "app"),
        "schedule": "0 */6 * * *",
        "destination": {
            "s3": {
                "bucket": bucket,
                "prefix": prefix,
                "endpoint": endpoint,
                "credentialsSecretRef": {"name": "backup-s3-credentials"},
                "serverSideEncryption": "None",
            }
        },
        "encryption": {"gpg": {"passphraseSecretRef": {"name": "backup-passphrase", "key": "passphrase"}}},
    }


def create_policy(api: kubernetes.client.ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "BackupPolicy", "metadata": {"name": name}, "spec": spec}
    kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def ready(api: kubernetes.client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    policy = kubernetes.client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    conditions = (policy.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Ready"), {})


def test_ten_policies_sharing_a_bucket_reconciled_at_once_keep_ten_rules(
    api: kubernetes.client.ApiClient,
    namespace: str,
    crds_installed: list[str],
    s3_server: S3Server,
    wait_for: Callable[..., Any],
) -> None:
    bucket = new_bucket(s3_server)
    references(api, namespace, s3_server)
    names = [f"tenant-{n}" for n in range(POLICIES)]
    for name in names:  # all there before the operator starts: its first passes run at once
        create_policy(api, namespace, name, policy_spec(s3_server.endpoint, bucket, f"backups/{name}"))

    with kopf.testing.KopfRunner([*OPERATOR_ARGS, "--namespace", namespace], timeout=60) as runner:
        wait_for(
            lambda: all(ready(api, namespace, name).get("status") == "True" for name in names),
            timeout=120,
            what="every policy Ready=True",
        )
    assert runner.exception is None

    rules = s3_server.client().get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert sorted(r["Filter"]["Prefix"] for r in rules) == sorted(f"backups/{name}/" for name in names)
    assert all(r["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1} for r in rules)
