"""ScalingProfile manifests: the owned autoscaling/v2 HPA, the server-side-apply configuration of container
resources, and the comparisons that keep a no-op resync free of writes. Pure: no I/O."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..models.common import WorkloadRef, parse_quantity
from ..models.scaling import Autoscaling, ContainerResources, OriginalResources, ScalingRules
from ..settings import MANAGED_BY, PREFIX
from .common import contains

HPA_API_VERSION = "autoscaling/v2"
APPLIED_HASH = f"{PREFIX}/applied-hash"
# The resources a profile manages; others (ephemeral-storage, extended resources) are never touched.
MANAGED_RESOURCES = ("cpu", "memory")
SECTIONS = ("requests", "limits")
# What a VPA controls when its container policy does not say.
VPA_DEFAULT_RESOURCES = ("cpu", "memory")

ContainerResourceMap = dict[str, dict[str, dict[str, str]]]  # container -> section -> resource -> quantity


def _rules(rules: ScalingRules) -> dict[str, Any]:
    policies = [
        {"type": kind, "value": value, "periodSeconds": 60}
        for kind, value in (("Percent", rules.max_percent_per_minute), ("Pods", rules.max_pods_per_minute))
        if value is not None
    ]
    out: dict[str, Any] = {}
    if rules.stabilization_window_seconds is not None:
        out["stabilizationWindowSeconds"] = rules.stabilization_window_seconds
    if policies:
        out["policies"] = policies
    return out


def _metric(resource: str, utilization: int) -> dict[str, Any]:
    return {
        "type": "Resource",
        "resource": {"name": resource, "target": {"type": "Utilization", "averageUtilization": utilization}},
    }


def build_hpa_spec(
    autoscaling: Autoscaling, target: WorkloadRef, *, min_replicas: int, max_replicas: int
) -> dict[str, Any]:
    """The HPA's spec: the effective bounds (window or override applied) and the utilization targets."""
    metrics = [
        _metric(resource, utilization)
        for resource, utilization in (("cpu", autoscaling.cpu_utilization), ("memory", autoscaling.memory_utilization))
        if utilization is not None
    ]
    spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": target.kind, "name": target.name},
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "metrics": metrics,
    }
    behavior = autoscaling.behavior
    if behavior is not None:
        directions = {
            key: _rules(rules)
            for key, rules in (("scaleUp", behavior.scale_up), ("scaleDown", behavior.scale_down))
            if rules is not None
        }
        if directions:
            spec["behavior"] = directions
    return spec


def build_hpa(spec: dict[str, Any], *, name: str, namespace: str, owner: dict[str, Any]) -> dict[str, Any]:
    """The HPA manifest to apply, owned by the profile (``owner`` is its owner reference)."""
    return {
        "apiVersion": HPA_API_VERSION,
        "kind": "HorizontalPodAutoscaler",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(MANAGED_BY),
            "annotations": {APPLIED_HASH: config_hash(spec)},
            "ownerReferences": [owner],
        },
        "spec": spec,
    }


def config_hash(config: dict[str, Any]) -> str:
    """A short, stable fingerprint of an applied configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def hpa_up_to_date(current: dict[str, Any], desired: dict[str, Any]) -> bool:
    """No apply needed: same configuration last applied (so nothing to remove) and nobody changed a value."""
    annotations = current.get("metadata", {}).get("annotations") or {}
    return (
        annotations.get(APPLIED_HASH) == desired["metadata"]["annotations"][APPLIED_HASH]
        and contains(current.get("metadata", {}).get("ownerReferences"), desired["metadata"]["ownerReferences"])
        and contains(current.get("spec"), desired["spec"])
    )


def targets(hpa: dict[str, Any], target: WorkloadRef) -> bool:
    """Whether an HPA scales the workload."""
    ref = hpa.get("spec", {}).get("scaleTargetRef", {})
    return bool(ref.get("kind") == target.kind and ref.get("name") == target.name)


def _managed(resources: dict[str, Any] | None) -> dict[str, dict[str, str]]:
    """The cpu/memory requests and limits of a container's ``resources``, sections without them left out."""
    out: dict[str, dict[str, str]] = {}
    for section in SECTIONS:
        values = {k: str(v) for k, v in ((resources or {}).get(section) or {}).items() if k in MANAGED_RESOURCES}
        if values:
            out[section] = values
    return out


def containers_of(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pod template's containers by name."""
    containers = workload.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []
    return {c["name"]: c for c in containers}


def record_original(container: dict[str, Any]) -> OriginalResources:
    """A container's cpu/memory requests and limits before the profile changes them."""
    current = _managed(container.get("resources"))
    return OriginalResources(
        container=container["name"], requests=current.get("requests", {}), limits=current.get("limits", {})
    )


def desired_resources(profile: list[ContainerResources], originals: list[OriginalResources]) -> ContainerResourceMap:
    """Per container: the profile's values over the originals. A container or value the profile no longer
    names goes back to its original, so the originals are always what the profile owns."""
    out: ContainerResourceMap = {}
    for original in originals:
        out[original.container] = {
            s: dict(v) for s, v in (("requests", original.requests), ("limits", original.limits))
        }
    for wanted in profile:
        merged = out.setdefault(wanted.container, {"requests": {}, "limits": {}})
        for section in SECTIONS:
            values = getattr(wanted, section)
            if values is not None:
                merged[section].update(values.model_dump(exclude_none=True))
    return {c: {s: v for s, v in sections.items() if v} for c, sections in out.items()}


def original_resources(originals: list[OriginalResources]) -> ContainerResourceMap:
    """The originals as a resource map (what Restore applies)."""
    return desired_resources([], originals)


def resources_up_to_date(workload: dict[str, Any], desired: ContainerResourceMap) -> bool:
    """Whether the named containers' cpu/memory requests and limits already equal ``desired`` (numerically:
    the API server canonicalizes quantities, e.g. 2000m becomes 2)."""
    containers = containers_of(workload)
    for name, sections in desired.items():
        current = _managed(containers.get(name, {}).get("resources"))
        for section in SECTIONS:
            have, want = current.get(section, {}), sections.get(section, {})
            if have.keys() != want.keys() or any(parse_quantity(have[k]) != parse_quantity(want[k]) for k in want):
                return False
    return True


def build_resources_apply(target: WorkloadRef, namespace: str, resources: ContainerResourceMap) -> dict[str, Any]:
    """The server-side-apply configuration that sets only the named containers' resources."""
    return {
        "apiVersion": "apps/v1",
        "kind": target.kind,
        "metadata": {"name": target.name, "namespace": namespace},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": name, "resources": sections} for name, sections in sorted(resources.items())
                    ]
                }
            }
        },
    }


def vpa_overlap(vpa: dict[str, Any], target: WorkloadRef, profile: list[ContainerResources]) -> list[str]:
    """``container/resource`` pairs that both the profile and an active VPA set (empty: no conflict)."""
    spec = vpa.get("spec", {})
    ref = spec.get("targetRef", {})
    if ref.get("kind") != target.kind or ref.get("name") != target.name:
        return []
    if (spec.get("updatePolicy") or {}).get("updateMode") == "Off":
        return []
    policies = {p.get("containerName", "*"): p for p in (spec.get("resourcePolicy") or {}).get("containerPolicies", [])}
    overlap = []
    for wanted in profile:
        policy = policies.get(wanted.container, policies.get("*", {}))
        if policy.get("mode") == "Off":
            continue
        controlled = policy.get("controlledResources") or VPA_DEFAULT_RESOURCES
        for resource in MANAGED_RESOURCES:
            if resource in controlled and any(
                getattr(getattr(wanted, s), resource, None) is not None for s in SECTIONS
            ):
                overlap.append(f"{wanted.container}/{resource}")
    return overlap
