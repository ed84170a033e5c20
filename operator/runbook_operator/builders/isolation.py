"""EmergencyIsolation's manifests, snapshots and evidence archive, as pure functions of plain dicts."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..models.common import LabelSelector
from ..models.isolation import NetworkIsolation, SavedPolicy, WorkloadSnapshot
from ..settings import MANAGED_BY, PREFIX

POLICY_NAME = "emergency-isolate"  # the runbook's name, so its hand-run "Restore Service" still finds it
SNAPSHOT_ANNOTATION = f"{PREFIX}/isolation-snapshot"
ISOLATION_LABEL = f"{PREFIX}/isolation"
SCALABLE = ("Deployment", "StatefulSet")
# What a manifest saved for recreation keeps of the metadata (not the API server's fields, owners, finalizers).
_SAVED_METADATA = frozenset({"name", "namespace", "labels", "annotations"})
_PEER = frozenset({"podSelector", "namespaceSelector", "ipBlock"})
_PORT = frozenset({"protocol", "port", "endPort"})


def build_network_policy(network: NetworkIsolation, *, namespace: str, owner: dict[str, Any]) -> dict[str, Any]:
    """The runbook's deny-all policy (``deny_all_spec``), owned by the isolation and labelled with its name."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": POLICY_NAME,
            "namespace": namespace,
            "labels": {**MANAGED_BY, ISOLATION_LABEL: owner["name"]},
            "ownerReferences": [owner],
        },
        "spec": deny_all_spec(network),
    }


def deny_all_spec(network: NetworkIsolation) -> dict[str, Any]:
    """The deny-all policy's spec: every pod, no ingress, no egress except DNS and the allowed CIDRs."""
    egress: list[dict[str, Any]] = []
    if network.allow_dns:
        egress.append(
            {
                "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
            }
        )
    if network.allow_egress_to:
        egress.append({"to": [{"ipBlock": {"cidr": cidr}} for cidr in network.allow_egress_to]})
    spec: dict[str, Any] = {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    if egress:
        spec["egress"] = egress
    return spec


def policy_for_recreation(policy: dict[str, Any]) -> dict[str, Any]:
    """A NetworkPolicy as it can be created again: its name, namespace, labels, annotations and spec (not the
    fields the API server fills in, nor owners or finalizers)."""
    metadata = {k: v for k, v in policy["metadata"].items() if k in _SAVED_METADATA}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": metadata, "spec": policy["spec"]}


def save_policy(policy: dict[str, Any]) -> SavedPolicy:
    """What status keeps of a NetworkPolicy the isolation removes."""
    manifest = policy_for_recreation(policy)
    return SavedPolicy(name=manifest["metadata"]["name"], manifest=json.dumps(manifest, sort_keys=True))


def saved_policies_name(isolation: str) -> str:
    """The ConfigMap in which operators before issue 13 kept the removed policies (never read: see README)."""
    return f"{isolation}-saved-policies"[:253]


def _only(value: Any, where: str, keys: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} is not an object")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]} is not a field it may have")
    return value


def _rules(value: Any, where: str, peers: str) -> None:
    if not isinstance(value, list):
        raise ValueError(f"{where} is not a list")
    for index, item in enumerate(value):
        rule = _only(item, f"{where}[{index}]", frozenset({peers, "ports"}))
        for name, item_keys in ((peers, _PEER), ("ports", _PORT)):
            items = rule.get(name, [])
            if not isinstance(items, list):
                raise ValueError(f"{where}[{index}].{name} is not a list")
            for position, entry in enumerate(items):
                _only(entry, f"{where}[{index}].{name}[{position}]", item_keys)


def checked_policy(saved: SavedPolicy, *, namespace: str) -> dict[str, Any]:
    """The manifest to recreate, if it is a NetworkPolicy of ``namespace`` named ``saved.name`` with only the
    fields a NetworkPolicy has (the API server checks the values); otherwise ValueError saying what is wrong."""
    try:
        document = json.loads(saved.manifest)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error.msg})") from None
    document = _only(document, "manifest", frozenset({"apiVersion", "kind", "metadata", "spec"}))
    if (document.get("apiVersion"), document.get("kind")) != ("networking.k8s.io/v1", "NetworkPolicy"):
        raise ValueError("not a networking.k8s.io/v1 NetworkPolicy")
    metadata = _only(document.get("metadata"), "metadata", _SAVED_METADATA)
    if metadata.get("name") != saved.name:
        raise ValueError(f"metadata.name is not {saved.name}")
    if metadata.get("namespace", namespace) != namespace:
        raise ValueError(f"metadata.namespace is not {namespace}")
    for name in ("labels", "annotations"):
        values = metadata.get(name, {})
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            raise ValueError(f"metadata.{name} is not a map of strings")
    spec = _only(document.get("spec"), "spec", frozenset({"podSelector", "policyTypes", "ingress", "egress"}))
    if not isinstance(spec.get("podSelector"), dict):
        raise ValueError("spec.podSelector is missing")
    types = spec.get("policyTypes", [])
    if not isinstance(types, list) or not set(types) <= {"Ingress", "Egress"}:
        raise ValueError("spec.policyTypes may hold only Ingress and Egress")
    _rules(spec.get("ingress", []), "spec.ingress", "from")
    _rules(spec.get("egress", []), "spec.egress", "to")
    return {**document, "metadata": {**metadata, "namespace": namespace}}


def _hpa_for(hpas: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    for hpa in hpas:
        target = hpa.get("spec", {}).get("scaleTargetRef", {})
        if target.get("kind") == kind and target.get("name") == name:
            return hpa
    return None


def recorded_snapshot(workload: dict[str, Any], *, uid: str) -> WorkloadSnapshot | None:
    """The snapshot this isolation (by uid) wrote onto the workload, if any."""
    text = (workload["metadata"].get("annotations") or {}).get(SNAPSHOT_ANNOTATION)
    if not text:
        return None
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(document, dict) or document.get("uid") != uid:
        return None
    return WorkloadSnapshot.model_validate(document["snapshot"])


def snapshot_workloads(
    workloads: list[dict[str, Any]],
    hpas: list[dict[str, Any]],
    keep_running: LabelSelector,
    *,
    uid: str,
    previous: list[WorkloadSnapshot],
) -> list[WorkloadSnapshot]:
    """One entry per workload (each dict carries its ``kind``). What an earlier pass recorded, in status or on
    the workload itself, wins over live values: those may already be the zeros this isolation set. Entries of
    workloads deleted since are kept, so that release can say so."""
    entries = {(s.kind, s.name): s for s in previous}
    for workload in workloads:
        kind, name = workload["kind"], workload["metadata"]["name"]
        if (kind, name) in entries:
            continue
        entry = recorded_snapshot(workload, uid=uid)
        if entry is None:
            labels = workload["metadata"].get("labels") or {}
            entry = WorkloadSnapshot(kind=kind, name=name, kept=keep_running.matches(labels))
            if kind == "CronJob":
                entry.suspend = bool(workload["spec"].get("suspend", False))
            else:
                entry.replicas = workload["spec"].get("replicas", 1)
                hpa = _hpa_for(hpas, kind, name)
                if hpa is not None:
                    entry.hpa = hpa["metadata"]["name"]
                    entry.hpa_min_replicas = hpa["spec"].get("minReplicas", 1)
                    entry.hpa_max_replicas = hpa["spec"]["maxReplicas"]
        entries[(kind, name)] = entry
    return [entries[key] for key in sorted(entries)]


def annotate_patch(entry: WorkloadSnapshot, *, isolation: str, uid: str) -> dict[str, Any]:
    """Records the snapshot on the workload itself, so a lost status cannot lose it."""
    document = {"isolation": isolation, "uid": uid, "snapshot": entry.to_api()}
    return {"metadata": {"annotations": {SNAPSHOT_ANNOTATION: json.dumps(document, sort_keys=True)}}}


def workload_state(entry: WorkloadSnapshot, workload: dict[str, Any]) -> int | bool:
    """What the snapshot records, as the workload has it now: replicas, or a CronJob's suspend."""
    if entry.kind == "CronJob":
        return bool(workload["spec"].get("suspend", False))
    return int(workload["spec"].get("replicas", 1))


def recorded_state(entry: WorkloadSnapshot) -> int | bool | None:
    return entry.suspend if entry.kind == "CronJob" else entry.replicas


def is_stopped(entry: WorkloadSnapshot, workload: dict[str, Any]) -> bool:
    """Whether the workload is in the state isolation puts it in."""
    return workload_state(entry, workload) == (True if entry.kind == "CronJob" else 0)


def stop_patch(entry: WorkloadSnapshot) -> dict[str, Any]:
    """Scale to zero, or suspend a CronJob."""
    if entry.kind == "CronJob":
        return {"spec": {"suspend": True}}
    return {"spec": {"replicas": 0}}


def restore_patch(entry: WorkloadSnapshot, *, restore_spec: bool) -> dict[str, Any]:
    """Removes the snapshot annotation and, unless the user changed the workload by hand, restores it."""
    patch: dict[str, Any] = {"metadata": {"annotations": {SNAPSHOT_ANNOTATION: None}}}
    if restore_spec:
        patch["spec"] = {"suspend": entry.suspend} if entry.kind == "CronJob" else {"replicas": entry.replicas}
    return patch


def scaled_summary(snapshot: list[WorkloadSnapshot], *, scaled: bool) -> str:
    """``n/m``: Deployments and StatefulSets at zero because of this isolation, of all of them."""
    scalable = [s for s in snapshot if s.kind in SCALABLE]
    return f"{sum(1 for s in scalable if not s.kept) if scaled else 0}/{len(scalable)}"


def requested_by(metadata: dict[str, Any]) -> str:
    """Who created the object, as far as the object itself tells: the field manager that first wrote its spec
    (kubectl, argocd, ...). The authenticated user is only in the API server's audit log."""
    entries = [
        m
        for m in metadata.get("managedFields") or []
        if m.get("operation") in ("Update", "Apply") and "f:spec" in (m.get("fieldsV1") or {})
    ]
    entries.sort(key=lambda m: m.get("time") or "")
    return str(entries[0].get("manager", "unknown")) if entries else "unknown"


@dataclass(frozen=True)
class FileDigest:
    """One file of the evidence archive."""

    name: str
    size: int
    sha256: str


def custody_manifest(
    *,
    body: Mapping[str, Any],
    requester: str,
    archive_key: str,
    archive_sha256: str,
    archive_size: int,
    tar_sha256: str,
    files: list[FileDigest],
    encryption: dict[str, Any],
    times: dict[str, str],
    log_errors: dict[str, str],
) -> dict[str, Any]:
    """The chain-of-custody record stored next to the archive (written last: it commits the evidence)."""
    spec = body["spec"]
    return {
        "schemaVersion": 1,
        "kind": "EmergencyIsolationEvidence",
        "incidentId": spec["incidentId"],
        "reason": spec["reason"],
        "severity": spec.get("severity", "P1"),
        "requestedBy": requester,
        "isolation": {
            "namespace": body["metadata"]["namespace"],
            "name": body["metadata"]["name"],
            "uid": body["metadata"]["uid"],
        },
        "times": times,
        "archive": {
            "key": archive_key,
            "format": "tar, then OpenPGP (gpg --decrypt)",
            "sha256": archive_sha256,
            "size": archive_size,
            "plaintextSha256": tar_sha256,
            "encryption": encryption,
        },
        "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in files],
        "logErrors": log_errors,
    }
