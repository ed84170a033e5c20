"""The generated CRDs on the real API server: Established, samples apply, invalid objects are rejected by
the API server itself (OpenAPI schema or CEL) with a message naming the field."""

from __future__ import annotations

from typing import Any

import kubernetes
import pytest
from tests.helpers import DELETE, load_samples, with_change

from runbook_operator.models import GROUP, KINDS_BY_NAME, VERSION

pytestmark = pytest.mark.integration
SAMPLES = load_samples()


def create(api: kubernetes.client.ApiClient, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    kind = KINDS_BY_NAME[obj["kind"]]
    objects = kubernetes.client.CustomObjectsApi(api)
    created: dict[str, Any]
    if kind.scope == "Cluster":  # named after the test's namespace, so that no two tests share one
        created = objects.create_cluster_custom_object(
            GROUP, VERSION, kind.plural, with_change(obj, "metadata.name", namespace)
        )
        return created
    obj = with_change(obj, "metadata.namespace", namespace)
    created = objects.create_namespaced_custom_object(GROUP, VERSION, namespace, kind.plural, obj)
    return created


def test_every_crd_is_established(crds_installed: list[str]) -> None:
    assert sorted(crds_installed) == sorted(k.crd_name for k in KINDS_BY_NAME.values())


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_applies(api: kubernetes.client.ApiClient, crds_installed: list[str], namespace: str, name: str) -> None:
    created = create(api, namespace, SAMPLES[name])
    assert created["metadata"]["uid"]
    # Defaults from the models are applied by the API server.
    if created["kind"] == "BackupPolicy":
        assert created["spec"]["deletionPolicy"] == "Retain" and created["spec"]["concurrencyPolicy"] == "Forbid"


REJECTED: list[tuple[str, str, Any, str]] = [
    ("backuppolicy-postgresql", "spec.retention.maxAge", "7x", "spec.retention.maxAge"),
    (
        "backuppolicy-postgresql",
        "spec.source.redis",
        {"host": "redis"},
        "set exactly one of postgresql, redis, kubernetes",
    ),
    (
        "backuppolicy-postgresql",
        "spec.encryption.gpg.passphraseSecretRef",
        {"name": "p", "key": "k"},
        "set exactly one of recipientsConfigMapRef and passphraseSecretRef",
    ),
    ("backuppolicy-postgresql", "spec.source.postgresql.credentialsSecretRef.passwordKey", "", "passwordKey"),
    ("backuprestore", "spec.policyRef", "Not_A_Name", "spec.policyRef"),
    ("backuprestore", "spec.scaleDown.0.kind", "DaemonSet", "spec.scaleDown[0].kind"),
    ("backuprestore", "spec.policyRef", DELETE, "spec.policyRef"),
    ("secretrotation", "spec.schedule", "0 3 * * *", "set at most one of schedule and interval"),
    ("secretrotation", "spec.generator.length", 8, "spec.generator.length"),
    ("secretrotation", "spec.secretRef.key", "", "spec.secretRef.key"),
    ("secretrotation", "spec.strategy", "dual", "strategy dual needs target.postgresql"),
    ("emergencyisolation", "spec.severity", "P0", "spec.severity"),
    ("emergencyisolation", "spec.incidentId", "INC 42; drop", "spec.incidentId"),
    ("emergencyisolation", "spec.scaleToZero.keepRunning.matchExpressions.0.values", [], "In and NotIn need values"),
    ("scalingprofile", "spec.autoscaling.minReplicas", 11, "minReplicas must not exceed maxReplicas"),
    ("scalingprofile", "spec.autoscaling.cpuUtilization", -5, "spec.autoscaling.cpuUtilization"),
    ("scalingprofile", "spec.resources.0.limits.memory", "1 gigabyte", "spec.resources[0].limits.memory"),
    ("scalingprofile", "spec.windows.0.minReplicas", 20, "minReplicas must not exceed maxReplicas"),
    ("runbookgrant", "spec.hosts.0.port", 0, "spec.hosts[0].port"),
    ("runbookgrant", "spec.hosts.0.host", "127.1", "non-standard form"),
    ("runbookgrant", "spec.s3.0", {"ambientCredentials": True}, "ambientCredentials needs buckets"),
    ("runbookgrant", "spec.s3.0.endpoint", "https://minio/path", "spec.s3[0].endpoint"),
]


@pytest.mark.parametrize(("sample", "path", "value", "expected"), REJECTED, ids=lambda v: str(v)[:40])
def test_api_server_rejects_invalid_object(
    api: kubernetes.client.ApiClient,
    crds_installed: list[str],
    namespace: str,
    sample: str,
    path: str,
    value: Any,
    expected: str,
) -> None:
    obj = SAMPLES[sample]
    if sample == "secretrotation" and path == "spec.strategy":
        obj = with_change(obj, "spec.target", DELETE)
    with pytest.raises(kubernetes.client.ApiException) as info:
        create(api, namespace, with_change(obj, path, value))
    assert info.value.status == 422
    assert expected in info.value.body


def test_three_rejections_per_kind() -> None:
    counts: dict[str, int] = {}
    for sample, *_ in REJECTED:
        counts[SAMPLES[sample]["kind"]] = counts.get(SAMPLES[sample]["kind"], 0) + 1
    assert set(counts) == set(KINDS_BY_NAME) and min(counts.values()) >= 3
