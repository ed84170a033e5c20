"""Each kind holds its spec to the tenancy rules before anything leaves (issue 13): a foreign host, a foreign S3
endpoint, a cross-namespace export and plaintext without the object's opt-out are refused with a condition
naming the field, and the foreign side records nothing. (tests/integration/test_tenancy.py tries the same
paths with a tenant's token; these tests use the administrator's client and one object per path.)"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import kopf.testing
import kubernetes
import pytest
from tests.integration.conftest import grant
from tests.services import CleartextTrap, GpgKeyring, Postgres, S3Server
from tests.silent import SilentEndpoint

GROUP, VERSION = "runbook.dev", "v1alpha1"


@pytest.fixture
def listener() -> Iterator[SilentEndpoint]:
    """An S3 endpoint nobody granted, on 127.0.0.1: it counts the connections made to it (``connections``)."""
    with SilentEndpoint() as server:
        yield server


@pytest.fixture
def trap() -> Iterator[CleartextTrap]:
    with CleartextTrap() as server:
        yield server


class Objects:
    """The test namespace's runbook.dev objects and what the operator made of them, as the administrator."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self.core = kubernetes.client.CoreV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)

    def secret(self, name: str, data: dict[str, str]) -> None:
        self.core.create_namespaced_secret(self.namespace, {"metadata": {"name": name}, "stringData": data})

    def create(self, plural: str, kind: str, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, body)

    def condition(self, plural: str, name: str, type_: str = "Ready") -> dict[str, Any] | None:
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)
        found = [c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_]
        return found[0] if found else None

    def refusal(self, wait_for: Callable[..., Any], plural: str, name: str, field: str) -> dict[str, Any]:
        """The object's Ready=False condition once it names ``field``."""

        def refused() -> dict[str, Any] | None:
            ready = self.condition(plural, name)
            if ready is not None and ready["status"] == "False" and field in (ready.get("message") or ""):
                return ready
            return None

        found: dict[str, Any] = wait_for(refused, timeout=90, what=f"{plural}/{name} refused naming {field}")
        return found


@pytest.fixture
def objects(api: kubernetes.client.ApiClient, namespace: str) -> Objects:
    return Objects(api, namespace)


def pg_source(postgres: Postgres, **extra: Any) -> dict[str, Any]:
    connection = {
        "host": postgres.host,
        "port": postgres.port,
        "database": "postgres",
        "credentialsSecretRef": {"name": "db-credentials"},
    }
    return {"postgresql": {**connection, **extra}}


def policy_spec(source: dict[str, Any], endpoint: str, **extra: Any) -> dict[str, Any]:
    return {
        "source": source,
        "schedule": "0 */6 * * *",
        "destination": {
            "s3": {
                "bucket": f"backups-{uuid.uuid4().hex[:8]}",
                "endpoint": endpoint,
                "credentialsSecretRef": {"name": "backup-s3-credentials"},
                "serverSideEncryption": "None",
            }
        },
        "encryption": {"gpg": {"passphraseSecretRef": {"name": "backup-gpg-passphrase", "key": "passphrase"}}},
        **extra,
    }


def namespace_secrets(objects: Objects, s3_server: S3Server) -> None:
    objects.secret("db-credentials", {"username": Postgres.superuser, "password": Postgres.password})
    objects.secret("db-admin", {"username": Postgres.superuser, "password": Postgres.password})
    objects.secret(
        "backup-s3-credentials", {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": "x" * 20}
    )
    objects.secret("backup-gpg-passphrase", {"passphrase": "a-long-enough-passphrase"})
    objects.secret("app-db", {"password": "unchanged"})


def cron_jobs(objects: Objects) -> list[str]:
    batch = kubernetes.client.BatchV1Api(objects.core.api_client)
    return [job.metadata.name for job in batch.list_namespaced_cron_job(objects.namespace).items]


def test_backup_policy_foreign_endpoint_export_and_plaintext_are_refused(
    objects: Objects,
    postgres: Postgres,
    s3_server: S3Server,
    listener: SilentEndpoint,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    namespace_secrets(objects, s3_server)
    plaintext = pg_source(postgres, insecurePlaintext=True)
    objects.create("backuppolicies", "BackupPolicy", "foreign-endpoint", policy_spec(plaintext, listener.endpoint))
    export = {"kubernetes": {"namespaces": [objects.namespace, "kube-system"], "resources": ["configmaps"]}}
    objects.create("backuppolicies", "BackupPolicy", "export", policy_spec(export, s3_server.endpoint))
    objects.create("backuppolicies", "BackupPolicy", "no-opt-out", policy_spec(pg_source(postgres), s3_server.endpoint))

    refused = {
        "foreign-endpoint": objects.refusal(
            wait_for, "backuppolicies", "foreign-endpoint", "spec.destination.s3.endpoint"
        ),
        "export": objects.refusal(wait_for, "backuppolicies", "export", "spec.source.kubernetes.namespaces[1]"),
        "no-opt-out": objects.refusal(
            wait_for, "backuppolicies", "no-opt-out", "spec.source.postgresql.insecurePlaintext: true"
        ),
    }
    assert {name: c["reason"] for name, c in refused.items()} == dict.fromkeys(refused, "NotPermitted")
    assert "kube-system" in refused["export"]["message"]
    assert listener.connections == 0
    assert cron_jobs(objects) == []


def test_backup_policy_in_plaintext_shows_the_warning_condition(
    objects: Objects,
    postgres: Postgres,
    s3_server: S3Server,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    """Opted out and granted: the policy works, and SecureConnections says which connection is plaintext."""
    namespace_secrets(objects, s3_server)
    spec = policy_spec(pg_source(postgres, insecurePlaintext=True), s3_server.endpoint)
    objects.create("backuppolicies", "BackupPolicy", "plain", spec)
    secure = wait_for(
        lambda: objects.condition("backuppolicies", "plain", "SecureConnections"), timeout=90, what="SecureConnections"
    )
    assert (secure["status"], secure["reason"]) == ("False", "Plaintext")
    assert "spec.source.postgresql" in secure["message"]


def test_backup_restore_into_a_foreign_host_is_refused_before_a_byte_reaches_it(
    objects: Objects,
    postgres: Postgres,
    s3_server: S3Server,
    trap: CleartextTrap,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    namespace_secrets(objects, s3_server)
    spec = policy_spec(pg_source(postgres, insecurePlaintext=True), s3_server.endpoint)
    objects.create("backuppolicies", "BackupPolicy", "db", spec)
    objects.create(
        "backuprestores",
        "BackupRestore",
        "to-trap",
        {"policyRef": "db", "target": {"host": trap.host, "port": trap.port}},
    )
    ready = objects.refusal(wait_for, "backuprestores", "to-trap", "spec.target.host")
    assert ready["reason"] == "NotPermitted"
    assert trap.startups == [] and trap.received == b""


def test_secret_rotation_without_the_opt_out_sends_nothing_to_a_granted_host(
    api: kubernetes.client.ApiClient,
    objects: Objects,
    trap: CleartextTrap,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    """The host is granted (with plaintext), but the rotation did not opt out of TLS: refused naming the
    field, and the server asking for cleartext never hears from the operator (nor a foreign, ungranted one)."""
    grant(api, objects.namespace, hosts=[(trap.host, trap.port)])
    objects.secret("db-admin", {"username": "postgres", "password": "admin-password"})
    objects.secret("app-db", {"password": "unchanged"})
    target = {"host": trap.host, "port": trap.port, "user": "app", "adminSecretRef": {"name": "db-admin"}}
    for name, extra in (("no-opt-out", {}), ("foreign", {"port": 1, "insecurePlaintext": True})):
        spec = {"secretRef": {"name": "app-db", "key": "password"}, "rotateNow": "1"}
        objects.create(
            "secretrotations", "SecretRotation", name, {**spec, "target": {"postgresql": {**target, **extra}}}
        )
    opt_out = objects.refusal(wait_for, "secretrotations", "no-opt-out", "spec.target.postgresql.insecurePlaintext")
    foreign = objects.refusal(wait_for, "secretrotations", "foreign", "spec.target.postgresql.host")
    assert (opt_out["reason"], foreign["reason"]) == ("NotPermitted", "NotPermitted")
    assert trap.startups == [] and trap.received == b""
    stored = objects.core.read_namespaced_secret("app-db", objects.namespace).data
    assert stored == {"password": "dW5jaGFuZ2Vk"}  # base64 of "unchanged"


def test_emergency_isolation_evidence_to_a_foreign_endpoint_is_refused_and_changes_nothing(
    objects: Objects,
    s3_server: S3Server,
    gpg_keyring: GpgKeyring,
    listener: SilentEndpoint,
    operator_runner: kopf.testing.KopfRunner,
    wait_for: Callable[..., Any],
) -> None:
    objects.secret("evidence-s3", {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": "x" * 20})
    evidence = {
        "capture": True,
        "required": True,
        "destination": {
            "bucket": "evidence",
            "endpoint": listener.endpoint,
            "credentialsSecretRef": {"name": "evidence-s3"},
        },
        "encryption": {"gpg": {"passphraseSecretRef": {"name": "evidence-s3", "key": "AWS_SECRET_ACCESS_KEY"}}},
    }
    spec = {"reason": "test", "incidentId": "INC-1", "network": {"isolate": True}, "evidence": evidence}
    objects.create("emergencyisolations", "EmergencyIsolation", "breach", spec)
    ready = objects.refusal(wait_for, "emergencyisolations", "breach", "spec.evidence.destination.endpoint")
    assert ready["reason"] == "NotPermitted"
    assert listener.connections == 0
    policies = kubernetes.client.NetworkingV1Api(objects.core.api_client).list_namespaced_network_policy(
        objects.namespace
    )
    assert [p.metadata.name for p in policies.items] == []
