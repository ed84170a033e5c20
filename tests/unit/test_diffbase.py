"""LeanDiffBaseStorage builds exactly the essence kopf's own storage builds, from any body."""

from __future__ import annotations

import copy
from typing import Any, cast

import kopf
import pytest

from runbook_operator.diffbase import LeanDiffBaseStorage
from runbook_operator.settings import PREFIX

KOPF = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX, key="last-handled-configuration")
LEAN = LeanDiffBaseStorage.like(KOPF)


def _body(raw: dict[str, Any]) -> kopf.Body:
    return kopf.Body(cast(kopf.RawBody, raw))


POLICY: dict[str, Any] = {
    "apiVersion": "runbook.dev/v1alpha1",
    "kind": "BackupPolicy",
    "metadata": {
        "name": "db",
        "namespace": "ns",
        "uid": "u-1",
        "resourceVersion": "42",
        "generation": 3,
        "labels": {"team": "db"},
        "annotations": {
            "runbook.dev/backup-now": "t-1",
            f"{PREFIX}/last-handled-configuration": '{"spec": {"schedule": "0 3 * * *"}}',
            "kubectl.kubernetes.io/last-applied-configuration": "{}",
            "other.kopf.dev/last-handled-configuration": "{}",
        },
        "finalizers": [f"{PREFIX}/finalizer"],
        "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:schedule": {}}}}],
    },
    "spec": {"schedule": "0 3 * * *", "source": {"postgresql": {"host": "db"}}, "deletionPolicy": "Delete"},
    "status": {"phase": "Scheduled", "conditions": [{"type": "Ready", "status": "True"}]},
}
REPLICA_SET: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "ReplicaSet",
    "metadata": {
        "name": "r",
        "ownerReferences": [{"kind": "Deployment", "name": "d"}],  # kopf marks its keys: -ofDRS
        "annotations": {"a": "b", f"{PREFIX}/last-handled-configuration-ofDRS": "{}"},
    },
    "spec": {"replicas": 1},
}
BARE: dict[str, Any] = {"apiVersion": "v1", "kind": "Thing", "metadata": {"name": "t"}, "data": {"k": "v"}}


@pytest.mark.parametrize("raw", [POLICY, REPLICA_SET, BARE], ids=["policy", "replicaset", "bare"])
@pytest.mark.parametrize(
    "extra", [None, [], ["spec"], [("spec", "schedule")], ["status.phase"], ["metadata.generation"]], ids=str
)
def test_the_essence_is_kopfs(raw: dict[str, Any], extra: list[Any] | None) -> None:
    before = copy.deepcopy(raw)
    lean = LEAN.build(body=_body(raw), extra_fields=extra)
    assert lean == KOPF.build(body=_body(raw), extra_fields=extra)
    assert raw == before  # the body is not changed


def test_the_essence_does_not_share_the_bodys_values() -> None:
    raw = copy.deepcopy(POLICY)
    essence = LEAN.build(body=_body(raw))
    raw["spec"]["source"]["postgresql"]["host"] = "changed"
    raw["metadata"]["labels"]["team"] = "changed"
    assert essence["spec"]["source"]["postgresql"]["host"] == "db"
    assert essence["metadata"]["labels"]["team"] == "db"


def test_like_keeps_the_storage_settings() -> None:
    other = kopf.AnnotationsDiffBaseStorage(prefix="x.dev", key="k", v1=False, ignored_fields=["spec.secret"])
    lean = LeanDiffBaseStorage.like(other)
    assert (lean.prefix, lean.key, lean.v1, lean.ignored_fields) == ("x.dev", "k", False, ["spec.secret"])
    body = _body({"metadata": {"name": "n"}, "spec": {"secret": "s", "open": 1}})
    assert lean.build(body=body) == other.build(body=body) == {"spec": {"open": 1}}


def test_with_groups_only_those_groups_essence_is_built() -> None:
    lean = LeanDiffBaseStorage.like(KOPF, groups={"runbook.dev"})
    cronjob = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c"}, "spec": {"schedule": "x"}}
    assert lean.build(body=_body(cronjob)) == {}
    assert lean.build(body=_body(copy.deepcopy(POLICY))) == KOPF.build(body=_body(copy.deepcopy(POLICY)))
    assert LeanDiffBaseStorage.like(KOPF).build(body=_body(cronjob)) == KOPF.build(body=_body(cronjob))


def test_the_operator_compares_essences_of_its_own_kinds_only() -> None:
    """main.py's change handlers and daemons are all on runbook.dev kinds: the CronJobs, Jobs and NetworkPolicies
    it indexes and watches get no essence. A handler of a kind with no group would make it build every one."""
    from runbook_operator import main

    assert main.compared_groups() == {"runbook.dev"}
    registry = kopf.OperatorRegistry()
    kopf.on.create("v1", "configmaps", registry=registry)(lambda **_: None)
    kopf.daemon("runbook.dev", "v1alpha1", "backuppolicies", registry=registry)(lambda **_: None)
    assert main.compared_groups(registry) == {"", "runbook.dev"}
