"""ScalingProfile builders and spec checks, without a cluster."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from runbook_operator.builders import scaling as build
from runbook_operator.builders.common import owner_reference
from runbook_operator.errors import RunbookError, parse_spec
from runbook_operator.models.common import WorkloadRef
from runbook_operator.models.scaling import Autoscaling, ContainerResources, OriginalResources, ScalingProfileSpec

API = WorkloadRef(kind="Deployment", name="api")


def test_hpa_has_exactly_the_runbook_numbers() -> None:
    spec = build.build_hpa_spec(Autoscaling(), API, min_replicas=2, max_replicas=10)
    assert spec == {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api"},
        "minReplicas": 2,
        "maxReplicas": 10,
        "metrics": [
            {
                "type": "Resource",
                "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
            },
            {
                "type": "Resource",
                "resource": {"name": "memory", "target": {"type": "Utilization", "averageUtilization": 80}},
            },
        ],
    }


def test_hpa_behavior_and_ownership() -> None:
    autoscaling = Autoscaling.model_validate(
        {
            "memoryUtilization": None,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300, "maxPercentPerMinute": 10}},
        }
    )
    spec = build.build_hpa_spec(autoscaling, API, min_replicas=3, max_replicas=3)
    assert [m["resource"]["name"] for m in spec["metrics"]] == ["cpu"]
    assert spec["behavior"] == {
        "scaleDown": {
            "stabilizationWindowSeconds": 300,
            "policies": [{"type": "Percent", "value": 10, "periodSeconds": 60}],
        }
    }
    owner = owner_reference(
        {"apiVersion": "runbook.dev/v1alpha1", "kind": "ScalingProfile", "metadata": {"name": "api", "uid": "u1"}}
    )
    hpa = build.build_hpa(spec, name="api", namespace="ns", owner=owner)
    assert hpa["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "runbook-operator"}
    assert hpa["metadata"]["ownerReferences"][0]["uid"] == "u1"
    # The API server adds defaults; the HPA is still up to date. A changed value or configuration is not.
    current: dict[str, Any] = {
        "metadata": {**hpa["metadata"], "resourceVersion": "7"},
        "spec": {**spec, "behavior": {**spec["behavior"], "scaleUp": {"selectPolicy": "Max"}}},
    }
    assert build.hpa_up_to_date(current, hpa)
    assert not build.hpa_up_to_date({**current, "spec": {**current["spec"], "minReplicas": 1}}, hpa)
    other = build.build_hpa({**spec, "maxReplicas": 4}, name="api", namespace="ns", owner=owner)
    assert not build.hpa_up_to_date(current, other)


def test_desired_resources_overlay_the_originals() -> None:
    originals = [
        OriginalResources(container="api", requests={"cpu": "100m"}, limits={"cpu": "1", "memory": "256Mi"}),
        OriginalResources(container="old", requests={"memory": "64Mi"}),
    ]
    profile = [ContainerResources.model_validate({"container": "api", "limits": {"cpu": "2000m", "memory": "1Gi"}})]
    desired = build.desired_resources(profile, originals)
    # "old" is no longer in the profile: it goes back to its original; api keeps its original request.
    assert desired == {
        "api": {"requests": {"cpu": "100m"}, "limits": {"cpu": "2000m", "memory": "1Gi"}},
        "old": {"requests": {"memory": "64Mi"}},
    }
    assert build.original_resources(originals)["api"] == {"requests": {"cpu": "100m"}, "limits": originals[0].limits}


def test_resources_compare_numerically_and_only_cpu_and_memory() -> None:
    workload = {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "api",
                            "resources": {"limits": {"cpu": "2", "memory": "1Gi", "ephemeral-storage": "1Gi"}},
                        }
                    ]
                }
            }
        }
    }
    assert build.resources_up_to_date(workload, {"api": {"limits": {"cpu": "2000m", "memory": "1024Mi"}}})
    assert not build.resources_up_to_date(workload, {"api": {"limits": {"cpu": "2"}}})
    assert not build.resources_up_to_date(
        workload, {"api": {"limits": {"cpu": "2", "memory": "1Gi"}, "requests": {"cpu": "1"}}}
    )
    original = build.record_original(workload["spec"]["template"]["spec"]["containers"][0])
    assert (original.requests, original.limits) == ({}, {"cpu": "2", "memory": "1Gi"})
    config = build.build_resources_apply(API, "ns", {"api": {"limits": {"cpu": "2"}}})
    assert config["spec"] == {
        "template": {"spec": {"containers": [{"name": "api", "resources": {"limits": {"cpu": "2"}}}]}}
    }


def _vpa(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "vpa"}, "spec": {"targetRef": {"kind": "Deployment", "name": "api"}, **spec}}


@pytest.mark.parametrize(
    ("vpa", "overlap"),
    [
        (_vpa(), ["api/cpu", "api/memory"]),
        (_vpa(updatePolicy={"updateMode": "Off"}), []),
        (_vpa(targetRef={"kind": "Deployment", "name": "web"}), []),
        (_vpa(resourcePolicy={"containerPolicies": [{"containerName": "api", "mode": "Off"}]}), []),
        (
            _vpa(resourcePolicy={"containerPolicies": [{"containerName": "*", "controlledResources": ["memory"]}]}),
            ["api/memory"],
        ),
    ],
)
def test_vpa_overlap(vpa: dict[str, Any], overlap: list[str]) -> None:
    profile = [
        ContainerResources.model_validate({"container": "api", "requests": {"cpu": "1"}, "limits": {"memory": "1Gi"}})
    ]
    assert build.vpa_overlap(vpa, API, profile) == overlap


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"windows": [{"name": "w", "start": "0 8 * * *", "duration": "1h", "minReplicas": 1, "maxReplicas": 2}]},
            "spec: windows and override adjust the HPA's bounds: they need autoscaling",
        ),
        (
            {"autoscaling": {}, "override": {"replicas": 0, "until": "2030-01-01T00:00:00Z", "reason": "r"}},
            "spec.override.replicas: Input should be greater than or equal to 1",
        ),
        (
            {"resources": [{"container": "api"}, {"container": "api"}]},
            "spec: resources: api listed more than once",
        ),
        (
            {"resources": [{"container": "api", "limits": {"cpu": "two"}}]},
            "spec.resources.0.limits.cpu: String should match pattern",
        ),
    ],
)
def test_bad_specs_name_the_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(RunbookError) as error:
        parse_spec(ScalingProfileSpec, {"targetRef": {"name": "api"}, **spec})
    assert error.value.reason == "InvalidSpec"
    assert error.value.message.startswith(message)


def test_override_until_must_be_a_time() -> None:
    with pytest.raises(ValidationError):
        ScalingProfileSpec.model_validate(
            {
                "targetRef": {"name": "api"},
                "autoscaling": {},
                "override": {"replicas": 2, "until": "soon", "reason": "r"},
            }
        )
