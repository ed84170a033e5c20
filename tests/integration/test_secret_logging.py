"""`runbook-operator run --verbose` prints no secret, in any encoding, at any level.

The operator runs as its own process, as the Deployment runs it, at DEBUG level and with the default JSON
log format, against the real API server and S3 API server. It reads Secrets (a BackupPolicy's database,
passphrase and S3 credentials; a SecretRotation's current value, then writes a new one) whose values carry
characters that every encoding changes; one key is never read by the operator but comes back in the same
API responses, and one Secret carries kubectl's last-applied-configuration annotation (the data again,
JSON-escaped). The whole captured output is then searched for every value in every encoding.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import kubernetes
import pytest
import yaml
from tests.helpers import OperatorProcess
from tests.integration.conftest import grant
from tests.services import S3Server

pytestmark = pytest.mark.integration

GROUP, VERSION = "runbook.dev", "v1alpha1"
WaitFor = Callable[..., Any]


def secret_value(label: str) -> str:
    """A unique value with characters that plain, base64, URL, JSON and repr encodings all write differently."""
    return f"{label} {uuid.uuid4().hex[:12]}/+?&=\"'\\é~%"


def encodings(value: str) -> dict[str, str]:
    """Every form in which a value could reach a log line."""
    raw = value.encode()
    forms = {
        "plain": value,
        "base64": base64.b64encode(raw).decode(),
        "base64 unpadded": base64.b64encode(raw).decode().rstrip("="),
        "urlsafe base64": base64.urlsafe_b64encode(raw).decode(),
        "urlsafe base64 unpadded": base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "quote": urllib.parse.quote(value, safe=""),
        "quote (default safe)": urllib.parse.quote(value),
        "quote_plus": urllib.parse.quote_plus(value),
        "json": json.dumps(value)[1:-1],
        "json (non-ASCII kept)": json.dumps(value, ensure_ascii=False)[1:-1],
        "json in json": json.dumps(json.dumps(value)[1:-1])[1:-1],
        "repr": repr(value)[1:-1],
        "bytes repr": repr(raw)[2:-1],
        "json in bytes repr": repr(json.dumps(value).encode())[3:-2],
    }
    return forms


def leaks(secrets: dict[str, str], text: str) -> list[str]:
    return [
        f"{label} as {form}"
        for label, value in secrets.items()
        for form, encoded in encodings(value).items()
        if encoded in text
    ]


@pytest.fixture
def operator_process(operator_kubeconfig: Path, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    operator = OperatorProcess(operator_kubeconfig, namespace, tmp_path / "operator.log", extra_args=("--verbose",))
    try:
        yield operator
    finally:
        operator.stop()


def last_applied(name: str, data: dict[str, str]) -> str:
    """kubectl apply's annotation: the whole manifest, its data included, as a JSON string."""
    manifest = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque", "data": data}
    return json.dumps(manifest, separators=(",", ":"))


def test_verbose_operator_log_holds_no_secret_in_any_encoding(
    api: kubernetes.client.ApiClient,
    crds_installed: list[str],
    namespace: str,
    operator_kubeconfig: Path,
    s3_server: S3Server,
    operator_process: OperatorProcess,
    wait_for: WaitFor,
) -> None:
    core = kubernetes.client.CoreV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)
    bucket = f"log-scan-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    secrets = {
        "database password": secret_value("db"),
        "never-read key": secret_value("unread"),
        "gpg passphrase": secret_value("gpg"),
        "rotated password (old)": secret_value("old"),
        "S3 secret key": s3_server.secret_key,
        "S3 access key id": s3_server.access_key,
        "operator token": yaml.safe_load(operator_kubeconfig.read_text())["users"][0]["user"]["token"],
    }

    def create_secret(name: str, data: dict[str, str], *, applied: bool = False) -> None:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        metadata: dict[str, Any] = {"name": name}
        if applied:
            metadata["annotations"] = {"kubectl.kubernetes.io/last-applied-configuration": last_applied(name, encoded)}
        core.create_namespaced_secret(namespace, {"metadata": metadata, "data": encoded})

    create_secret(
        "db-credentials",
        {"username": "reader", "password": secrets["database password"], "unread": secrets["never-read key"]},
        applied=True,
    )
    create_secret("backup-passphrase", {"passphrase": secrets["gpg passphrase"]})
    create_secret(
        "backup-s3-credentials",
        {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key},
    )
    create_secret("app-password", {"PASSWORD": secrets["rotated password (old)"]}, applied=True)

    grant(api, namespace, hosts=[("127.0.0.1", 5432)])  # the policy's host (the tenancy rules)
    operator_process.start()
    policy = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "BackupPolicy",
        "metadata": {"name": "db"},
        "spec": {
            "source": {
                "postgresql": {
                    "host": "127.0.0.1",
                    "port": 5432,
                    "database": "app",
                    "credentialsSecretRef": {"name": "db-credentials"},
                    "insecurePlaintext": True,
                }
            },
            "schedule": "0 3 * * *",
            "destination": {
                "s3": {
                    "bucket": bucket,
                    "endpoint": s3_server.endpoint,
                    "credentialsSecretRef": {"name": "backup-s3-credentials"},
                    "serverSideEncryption": "None",
                }
            },
            "encryption": {"gpg": {"passphraseSecretRef": {"name": "backup-passphrase", "key": "passphrase"}}},
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "backuppolicies", policy)
    rotation = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SecretRotation",
        "metadata": {"name": "app"},
        "spec": {"secretRef": {"name": "app-password", "key": "PASSWORD"}, "rotateNow": "1"},
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "secretrotations", rotation)

    def rotated() -> bool:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "secretrotations", "app")
        return (obj.get("status") or {}).get("rotateNow") == "1"

    wait_for(rotated, timeout=90, what="the rotation to finish")

    # The policy's Secrets were read and the bucket reached with their keys (its lifecycle rule is written
    # through botocore, after the Secrets are checked and before any child object is applied).
    def lifecycle_written() -> bool:
        try:
            return bool(s3_server.client().get_bucket_lifecycle_configuration(Bucket=bucket).get("Rules"))
        except botocore.exceptions.ClientError:
            return False

    wait_for(lifecycle_written, timeout=60, what="the bucket's lifecycle rule")
    new = base64.b64decode(core.read_namespaced_secret("app-password", namespace).data["PASSWORD"]).decode()
    assert new != secrets["rotated password (old)"]
    secrets["rotated password (new)"] = new
    time.sleep(2)  # the last lines (Events posted, status patched) reach the log
    operator_process.terminate()

    output = operator_process.output()
    assert '"severity": "debug"' in output, "the operator did not log at DEBUG level"
    assert "secretrotations" in output and "backuppolicies" in output  # it did watch and handle both
    found = leaks(secrets, output)
    assert not found, "in the operator's log: " + "; ".join(found)
