"""SecretRotation: the pure parts (schedule, rollout judgement, manifests, generator)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from runbook_operator.builders import rotation as build
from runbook_operator.errors import RunbookError, parse_spec
from runbook_operator.models.rotation import Generator, SecretRotationSpec
from runbook_operator.reconcilers import rotation
from runbook_operator.reconcilers.rotation_targets import SecretOnly
from runbook_operator.reconcilers.runtime import Context
from tests.fake_api import FakeApi

CREATED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CREATED_AT = "2026-03-01T12:00:00Z"


def spec(**fields: Any) -> SecretRotationSpec:
    return SecretRotationSpec.model_validate({"secretRef": {"name": "db-credentials", "key": "password"}, **fields})


def test_interval_counts_from_last_rotation_else_creation() -> None:
    s = spec(interval="30d")
    assert build.next_rotation(s, last=None, created=CREATED) == CREATED + timedelta(days=30)
    last = CREATED + timedelta(days=3)
    assert build.next_rotation(s, last=last, created=CREATED) == last + timedelta(days=30)


def test_schedule_is_evaluated_in_its_time_zone() -> None:
    s = spec(schedule="0 3 * * *", timeZone="America/New_York")
    # 12:00 UTC is 07:00 in New York (EST): the next 03:00 there is the following day, 08:00 UTC.
    assert build.next_rotation(s, last=None, created=CREATED) == datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    # Across the spring-forward change (8 March 2026) 03:00 EDT is 07:00 UTC.
    after_dst = datetime(2026, 3, 9, 12, 0, tzinfo=UTC)
    assert build.next_rotation(s, last=after_dst, created=CREATED) == datetime(2026, 3, 10, 7, 0, tzinfo=UTC)


def test_without_schedule_only_rotate_now_rotates() -> None:
    assert build.next_rotation(spec(), last=None, created=CREATED) is None


def test_invalid_schedule_names_the_field() -> None:
    with pytest.raises(RunbookError) as caught:
        parse_spec(SecretRotationSpec, {"secretRef": {"name": "s", "key": "k"}, "schedule": "61 * * * *"})
    assert caught.value.reason == "InvalidSpec"
    assert caught.value.message.startswith("spec.schedule: invalid cron expression")


def test_dual_needs_a_username_key_and_a_short_group_name() -> None:
    target = {"postgresql": {"host": "h", "user": "app", "adminSecretRef": {"name": "a"}}}
    with pytest.raises(RunbookError, match="usernameKey"):
        parse_spec(SecretRotationSpec, {"secretRef": {"name": "s", "key": "k"}, "strategy": "dual", "target": target})
    target["postgresql"]["user"] = "x" * 62
    with pytest.raises(RunbookError, match="at most 61"):
        parse_spec(
            SecretRotationSpec,
            {"secretRef": {"name": "s", "key": "k", "usernameKey": "u"}, "strategy": "dual", "target": target},
        )


def deployment(generation: int = 2, **status: int) -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "spec": {"replicas": 2}, "status": status}


@pytest.mark.parametrize(
    ("workload", "expected"),
    [
        (deployment(observedGeneration=1), "waiting for the controller"),
        (deployment(observedGeneration=2, updatedReplicas=1, replicas=2), "1 of 2 replicas updated"),
        (deployment(observedGeneration=2, updatedReplicas=2, replicas=3), "1 old replicas pending termination"),
        (
            deployment(observedGeneration=2, updatedReplicas=2, replicas=2, availableReplicas=1),
            "1 of 2 updated replicas available",
        ),
        (deployment(observedGeneration=2, updatedReplicas=2, replicas=2, availableReplicas=2), None),
    ],
)
def test_deployment_rollout_judged_like_kubectl(workload: dict[str, Any], expected: str | None) -> None:
    reason = build.rollout_pending("Deployment", workload)
    assert reason == expected or (expected is not None and reason is not None and reason.startswith(expected))


def test_statefulset_rollout_waits_for_revision_and_refuses_on_delete() -> None:
    base = {"metadata": {"generation": 1}, "spec": {"replicas": 1}}
    rolling = {"observedGeneration": 1, "updatedReplicas": 1, "readyReplicas": 1}
    assert build.rollout_pending("StatefulSet", {**base, "status": {**rolling, "currentRevision": "a"}}) is not None
    done = {**rolling, "currentRevision": "b", "updateRevision": "b"}
    assert build.rollout_pending("StatefulSet", {**base, "status": done}) is None
    on_delete = {**base, "spec": {"replicas": 1, "updateStrategy": {"type": "OnDelete"}}, "status": done}
    assert "OnDelete" in (build.rollout_pending("StatefulSet", on_delete) or "")


def test_pending_secret_is_owned_labelled_and_annotated() -> None:
    owner = {
        "apiVersion": "runbook.dev/v1alpha1",
        "kind": "SecretRotation",
        "metadata": {"name": "app", "namespace": "ns", "uid": "u-1"},
    }
    secret = build.build_pending_secret(owner, rotation_id="r1", password="s3cret-value", username="app_b")
    assert secret["metadata"]["name"] == "app-rotation-pending"
    assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "runbook-operator"
    assert secret["metadata"]["annotations"] == {build.ROTATION_ID: "r1"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert base64.b64decode(secret["data"]["password"]).decode() == "s3cret-value"
    assert base64.b64decode(secret["data"]["username"]).decode() == "app_b"
    assert len(build.pending_secret_name("x" * 253)) == 253


def test_publish_names_only_the_rotated_keys() -> None:
    single = build.publish_patch(spec(), password="pw", username=None)
    assert set(single["data"]) == {"password"}
    dual = spec(
        secretRef={"name": "db", "key": "PASSWORD", "usernameKey": "USER"},
        strategy="dual",
        target={"postgresql": {"host": "h", "user": "app", "adminSecretRef": {"name": "a"}}},
    )
    assert set(build.publish_patch(dual, password="pw", username="app_a")["data"]) == {"PASSWORD", "USER"}


def test_dual_alternates_between_the_login_roles() -> None:
    assert build.dual_roles("app") == ("app_a", "app_b")
    assert build.idle_role("app", None) == "app_a"
    assert build.idle_role("app", "app") == "app_a"
    assert build.idle_role("app", "app_a") == "app_b"
    assert build.idle_role("app", "app_b") == "app_a"


def test_restart_stamps_the_pod_template() -> None:
    assert build.restart_patch("r1") == {"spec": {"template": {"metadata": {"annotations": {build.ROTATION_ID: "r1"}}}}}


@pytest.mark.parametrize(("alphabet", "allowed"), list(rotation.ALPHABETS.items()))
def test_generator_uses_the_alphabet_and_length(alphabet: str, allowed: str) -> None:
    values = {rotation.generate_password(Generator(length=40, alphabet=alphabet)) for _ in range(20)}  # type: ignore[arg-type]
    assert len(values) == 20
    assert all(len(v) == 40 and set(v) <= set(allowed) for v in values)


def test_fingerprint_is_short_and_stable() -> None:
    assert build.fingerprint("a") == build.fingerprint("a") != build.fingerprint("b")
    assert len(build.fingerprint("a")) == 12


def rotation_body(api: FakeApi, conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    metadata = {"name": "app", "uid": "u-1", "generation": 1, "creationTimestamp": CREATED_AT}
    status = {"conditions": conditions} if conditions is not None else {}
    spec = {"secretRef": {"name": "db-credentials", "key": "password"}, "interval": "30d"}
    return api.put(rotation.RESOURCE, "ns", {"metadata": metadata, "spec": spec, "status": status})


def condition(type: str, status: str, reason: str) -> dict[str, Any]:
    return {"type": type, "status": status, "reason": reason, "message": "m", "lastTransitionTime": "t"}


@pytest.mark.parametrize(
    ("conditions", "announced"),
    [
        (None, True),  # first seen: accepted
        ([condition("Ready", "False", "SecretNotFound")], True),  # every reference works again
        ([condition("Ready", "True", "Scheduled")], False),  # a quiet resync
        ([condition("Ready", "False", "RolloutIncomplete"), condition("Degraded", "True", "RolloutIncomplete")], False),
    ],
)
def test_the_schedule_is_announced_when_ready_begins_not_on_every_resync(
    conditions: list[dict[str, Any]] | None, announced: bool
) -> None:
    api = FakeApi()
    checked = rotation.Rotation(Context.of(rotation.ROTATION, rotation_body(api, conditions), api), SecretOnly())
    due = checked._schedule()
    assert due == CREATED + timedelta(days=30)
    expected = [("Scheduled", "next rotation at 2026-03-31T12:00:00Z")] if announced else []
    assert checked.announcements == expected


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        ({"type": "Opaque"}, None),
        ({}, None),  # no type: Opaque
        ({"type": "kubernetes.io/basic-auth"}, None),
        ({"metadata": {"annotations": {build.ROTATED_BY: "app"}}}, None),  # this rotation's own
        ({"metadata": {"ownerReferences": [{"uid": "u-1", "kind": "SecretRotation", "name": "app"}]}}, None),
        ({"type": "kubernetes.io/tls"}, "its type is kubernetes.io/tls"),
        ({"type": "kubernetes.io/service-account-token"}, "its type is kubernetes.io/service-account-token"),
        ({"type": "kubernetes.io/dockerconfigjson"}, "its type is kubernetes.io/dockerconfigjson"),
        ({"type": "kubernetes.io/dockercfg"}, "its type is kubernetes.io/dockercfg"),
        ({"type": "helm.sh/release.v1"}, "its type is helm.sh/release.v1"),
        (
            {"metadata": {"ownerReferences": [{"uid": "u-9", "kind": "Certificate", "name": "web"}]}},
            "it is owned by Certificate web (ownerReferences)",
        ),
        ({"metadata": {"annotations": {build.ROTATED_BY: "other"}}}, "SecretRotation other rotates it already"),
    ],
)
def test_a_rotation_writes_only_a_secret_it_may_own(secret: dict[str, Any], why: str | None) -> None:
    owner = {"metadata": {"name": "app", "uid": "u-1"}}
    found = build.rotated_secret_refusal(spec(), {"metadata": {}, **secret}, owner=owner)
    assert found == why or (why is not None and found is not None and found.startswith(why))


def test_a_rotation_never_writes_its_own_admin_secret() -> None:
    admin = spec(
        secretRef={"name": "db-admin", "key": "password"},
        target={"postgresql": {"host": "h", "user": "app", "adminSecretRef": {"name": "db-admin"}}},
    )
    owner = {"metadata": {"name": "app", "uid": "u-1"}}
    assert build.rotated_secret_refusal(admin, {"metadata": {}}, owner=owner) == (
        "it is the target's adminSecretRef, the login that rotates"
    )
    assert build.claim_patch("app") == {"metadata": {"annotations": {build.ROTATED_BY: "app"}}}
