"""The models accept the runbook's samples and reject bad input with an error naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from runbook_operator.models import KINDS_BY_NAME
from runbook_operator.models.common import parse_duration, parse_quantity
from tests.helpers import DELETE, load_samples, with_change

SAMPLES = load_samples()


def validate(obj: dict[str, Any]) -> None:
    KINDS_BY_NAME[obj["kind"]].spec.model_validate(obj["spec"])


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_validates(name: str) -> None:
    validate(SAMPLES[name])


def test_every_kind_has_a_sample() -> None:
    assert {s["kind"] for s in SAMPLES.values()} == set(KINDS_BY_NAME)


PG = "backuppolicy-postgresql"
BAD_INPUTS: list[tuple[str, str, Any, str]] = [
    # BackupPolicy
    (PG, "spec.schedule", "61 * * * *", "schedule"),
    (PG, "spec.schedule", "every day", "invalid cron expression"),
    (PG, "spec.retention.maxAge", "7x", "retention.maxAge"),
    (PG, "spec.timeZone", "Mars/Olympus", "unknown time zone"),
    (PG, "spec.source.redis", {"host": "redis"}, "exactly one of postgresql, redis, kubernetes"),
    (PG, "spec.source.postgresql.credentialsSecretRef.passwordKey", "", "passwordKey"),
    (PG, "spec.retention.minKeep", -1, "retention.minKeep"),
    (PG, "spec.source.postgresql.port", 70000, "source.postgresql.port"),
    (PG, "spec.destination.s3.bucket", "Bad_Bucket", "destination.s3.bucket"),
    (PG, "spec.encryption.gpg.passphraseSecretRef", {"name": "p", "key": "k"}, "exactly one of recipientsConfigMapRef"),
    (PG, "spec.sourc", {}, "sourc"),
    # BackupRestore
    ("backuprestore", "spec.policyRef", "Not_A_Name", "policyRef"),
    ("backuprestore", "spec.scaleDown.0.kind", "DaemonSet", "scaleDown.0.kind"),
    ("backuprestore", "spec.backup", "", "backup"),
    ("backuprestore", "spec.policyRef", DELETE, "policyRef"),
    ("backuprestore", "spec.target", {"port": 0}, "target.port"),
    # SecretRotation
    ("secretrotation", "spec.secretRef.key", "", "secretRef.key"),
    ("secretrotation", "spec.schedule", "0 3 * * *", "at most one of schedule and interval"),
    ("secretrotation", "spec.interval", "30days", "interval"),
    ("secretrotation", "spec.generator.length", 8, "generator.length"),
    ("secretrotation", "spec.strategy", "triple", "strategy"),
    ("secretrotation", "spec.target.redis", {"host": "r", "adminSecretRef": {"name": "a"}}, "at most one of"),
    ("secretrotation", "spec.timeZone", "Nowhere/City", "unknown time zone"),
    # EmergencyIsolation
    ("emergencyisolation", "spec.severity", "P0", "severity"),
    ("emergencyisolation", "spec.reason", "", "reason"),
    ("emergencyisolation", "spec.incidentId", "INC 42; drop", "incidentId"),
    ("emergencyisolation", "spec.scaleToZero.keepRunning.matchExpressions.0.operator", "Like", "operator"),
    ("emergencyisolation", "spec.scaleToZero.keepRunning.matchExpressions.0.values", [], "needs values"),
    ("emergencyisolation", "spec.network.allowDns", True, "allowDns"),
    # ScalingProfile
    ("scalingprofile", "spec.autoscaling.minReplicas", 11, "minReplicas (11) must not exceed maxReplicas (10)"),
    ("scalingprofile", "spec.autoscaling.cpuUtilization", -5, "autoscaling.cpuUtilization"),
    ("scalingprofile", "spec.resources.0.limits.memory", "1 gigabyte", "resources.0.limits.memory"),
    ("scalingprofile", "spec.resources.0.requests.cpu", "3", "requests.cpu (3) exceeds limits.cpu (2000m)"),
    ("scalingprofile", "spec.windows.0.duration", "10x", "windows.0.duration"),
    ("scalingprofile", "spec.windows.0.start", "0 25 * * *", "invalid cron expression"),
    ("scalingprofile", "spec.targetRef.kind", "Pod", "targetRef.kind"),
    # RunbookGrant (more in tests/unit/test_tenancy_rules.py)
    ("runbookgrant", "spec.namespaces", [], "namespaces"),
    ("runbookgrant", "spec.hosts.0.port", 0, "hosts.0.port"),
    ("runbookgrant", "spec.hosts.0.host", "127.1", "non-standard form"),
    ("runbookgrant", "spec.s3.0.endpoint", "https://minio/path", "s3.0.endpoint"),
    ("runbookgrant", "spec.s3.0", {"ambientCredentials": True}, "ambientCredentials needs buckets"),
]


@pytest.mark.parametrize(("sample", "path", "value", "expected"), BAD_INPUTS, ids=lambda v: str(v)[:40])
def test_bad_input_names_the_field(sample: str, path: str, value: Any, expected: str) -> None:
    bad = with_change(SAMPLES[sample], path, value)
    with pytest.raises(ValidationError) as info:
        validate(bad)
    assert expected in str(info.value)


def test_at_least_five_bad_inputs_per_kind() -> None:
    counts: dict[str, int] = {}
    for sample, *_ in BAD_INPUTS:
        kind = SAMPLES[sample]["kind"]
        counts[kind] = counts.get(kind, 0) + 1
    assert set(counts) == set(KINDS_BY_NAME)
    assert min(counts.values()) >= 5, counts


@pytest.mark.parametrize(("text", "days"), [("7y", 7 * 365), ("30d", 30), ("1y", 365), ("2w", 14)])
def test_parse_duration(text: str, days: int) -> None:
    assert parse_duration(text).days == days


def test_parse_duration_hours() -> None:
    assert parse_duration("12h").total_seconds() == 12 * 3600


@pytest.mark.parametrize(("text", "value"), [("500m", "0.5"), ("2", "2"), ("1Gi", str(2**30)), ("512Mi", str(2**29))])
def test_parse_quantity(text: str, value: str) -> None:
    assert str(parse_quantity(text).normalize()) == str(type(parse_quantity(text))(value).normalize())


def test_defaults_follow_the_runbook() -> None:
    spec = KINDS_BY_NAME["ScalingProfile"].spec.model_validate({"targetRef": {"name": "api"}, "autoscaling": {}})
    hpa = spec.to_api()["autoscaling"]
    assert (hpa["minReplicas"], hpa["maxReplicas"], hpa["cpuUtilization"], hpa["memoryUtilization"]) == (2, 10, 70, 80)
    ei = KINDS_BY_NAME["EmergencyIsolation"].spec.model_validate({"reason": "r", "incidentId": "INC-1"}).to_api()
    assert ei["scaleToZero"]["keepRunning"]["matchExpressions"][0]["values"] == ["postgresql", "redis"]
    assert ei["severity"] == "P1" and ei["evidence"]["required"] is True
