"""EmergencyIsolation: admit, contain the network, snapshot, preserve evidence, scale to zero; release exactly.

Every pass reads the cluster and converges, so a restart at any point resumes: the network policy goes first
(pure containment, removed on release), the snapshot is written to the workloads and to status before any
workload is touched, and evidence is committed before anything is scaled. Release works from the snapshot
annotations on the workloads, so it stays exact even if status was lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import kopf
from kubernetes.client import ApiException

from .. import metrics
from ..builders.common import owner_reference
from ..builders.isolation import (
    POLICY_NAME,
    annotate_patch,
    build_network_policy,
    build_saved_policies,
    is_stopped,
    recorded_snapshot,
    recorded_state,
    requested_by,
    restore_patch,
    saved_policies,
    saved_policies_name,
    scaled_summary,
    snapshot_workloads,
    stop_patch,
    workload_state,
)
from ..clients import kube
from ..conditions import now_rfc3339
from ..errors import RunbookError
from ..logs import audit
from ..models import GROUP, VERSION
from ..models.isolation import EmergencyIsolationSpec, NetworkIsolation, WorkloadSnapshot
from ..settings import FIELD_MANAGER
from . import evidence
from .base import StatusPatch, parse_spec, report_failure, retry_or_stop
from .interlock import active_isolation

KIND = "EmergencyIsolation"
PLURAL = "emergencyisolations"
ISOLATING, CONTAINED, ISOLATED = "Isolating", "Contained", "Isolated"
RELEASED, REJECTED, INVALID = "Released", "Rejected", "Invalid"
EVIDENCE_RETRY = 10.0  # seconds between attempts to capture evidence that failed for a fixable reason


def _workloads(namespace: str) -> list[dict[str, Any]]:
    """Every Deployment, StatefulSet and CronJob of the namespace as plain dicts carrying their kind."""
    apps, batch = kube.apps(), kube.batch()
    listings = (
        ("Deployment", apps.list_namespaced_deployment(namespace).items),
        ("StatefulSet", apps.list_namespaced_stateful_set(namespace).items),
        ("CronJob", batch.list_namespaced_cron_job(namespace).items),
    )
    serialize = kube.api_client().sanitize_for_serialization
    return [{**serialize(item), "kind": kind} for kind, items in listings for item in items]


def _patch_workload(kind: str, name: str, namespace: str, patch: dict[str, Any]) -> None:
    if kind == "Deployment":
        kube.apps().patch_namespaced_deployment(name, namespace, patch, field_manager=FIELD_MANAGER)
    elif kind == "StatefulSet":
        kube.apps().patch_namespaced_stateful_set(name, namespace, patch, field_manager=FIELD_MANAGER)
    else:
        kube.batch().patch_namespaced_cron_job(name, namespace, patch, field_manager=FIELD_MANAGER)


class Isolation:
    """One pass over one EmergencyIsolation: its body, its status changes, and the writes it makes."""

    def __init__(self, body: kopf.Body, *, retry: int = 0) -> None:
        self.retry = retry  # kopf's count of earlier attempts of this handler
        self.body: dict[str, Any] = {
            "apiVersion": body["apiVersion"],
            "kind": body["kind"],
            "metadata": dict(body["metadata"]),
            "spec": dict(body.get("spec", {})),
        }
        self.kopf_body = body
        self.seen = time.time()  # when this pass got the object: sub-second, unlike creationTimestamp
        self.namespace: str = body["metadata"]["namespace"]
        self.name: str = body["metadata"]["name"]
        self.uid: str = body["metadata"]["uid"]
        self.generation: int | None = body["metadata"].get("generation")
        self.status = StatusPatch(body.get("status"), self.generation)

    # --- status, Events, audit -------------------------------------------------------------------------

    def flush(self) -> None:
        """Write the collected status changes now (a checkpoint the next step relies on)."""
        self.status.write(plural=PLURAL, namespace=self.namespace, name=self.name)

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        (kopf.warn if warning else kopf.info)(self.kopf_body, reason=reason, message=message)

    def audit(self, event: str, step: str, **fields: Any) -> None:
        spec = self.body["spec"]
        audit(
            event,
            namespace=self.namespace,
            name=self.name,
            kind=KIND,
            step=step,
            incidentId=spec.get("incidentId"),
            severity=spec.get("severity", "P1"),
            requestedBy=requested_by(self.body["metadata"]),
            **fields,
        )

    def fail(self, raised: Exception, *, phase: str | None = None) -> kopf.TemporaryError | kopf.PermanentError:
        """Ready=False with the reason and a Warning Event; the kopf error that retries or waits. A foreseen
        failure (evidence that cannot be captured yet) is retried at its own pace, every 10 s, since a
        responder waits on it; an unforeseen one with backoff."""
        error = report_failure(self.kopf_body, self.status, raised, phase=phase)
        self.flush()
        return retry_or_stop(error, retry=0 if isinstance(raised, RunbookError) else self.retry)

    # --- isolate ---------------------------------------------------------------------------------------

    def isolate(self) -> None:
        phase = self.status.get("phase")
        if phase in (RELEASED, REJECTED):
            return
        try:
            spec = parse_spec(EmergencyIsolationSpec, self.body["spec"])
        except RunbookError as error:
            acted = self.status.get("isolatedAt") or self.status.get("snapshot")
            raise self.fail(error, phase=None if acted else INVALID) from None
        holder = active_isolation(self.namespace)
        if holder not in (None, self.name):
            raise self.reject(holder)
        if spec.network.isolate:
            self.contain(spec.network)
        self.admit(spec)
        metrics.ISOLATIONS_ACTIVE.labels(self.namespace).set(1)
        metrics.ISOLATION_INFO.labels(self.namespace, self.name, spec.incident_id, spec.severity).set(1)
        if spec.network.isolate:
            self.existing_policies(spec.network)
        if phase != ISOLATED:  # once isolated, changes made by hand are the responder's, not drift
            snapshot = self.snapshot(spec)
            if spec.evidence.capture:
                self.preserve_evidence(spec)
            else:
                self.status.condition("EvidencePreserved", "False", "CaptureDisabled", "spec.evidence.capture is false")
            if spec.scale_to_zero.enabled:
                self.scale_to_zero(snapshot)
        self.status.set(phase=ISOLATED)
        self.status.condition("Ready", "True", "Isolated", self.summary(spec))
        self.flush()

    def summary(self, spec: EmergencyIsolationSpec) -> str:
        parts = [f"network {'contained' if spec.network.isolate else 'open (network.isolate false)'}"]
        if spec.evidence.capture:
            preserved = (self.status.get("evidence") or {}).get("key")
            parts.append("evidence preserved" if preserved else "evidence NOT preserved (see EvidencePreserved)")
        if spec.scale_to_zero.enabled:
            parts.append(f"{self.status.get('scaled')} workloads at zero")
        return ", ".join(parts)

    def reject(self, holder: str) -> kopf.TemporaryError | kopf.PermanentError:
        error = RunbookError(
            "AlreadyIsolated",
            f"namespace {self.namespace} is already isolated by EmergencyIsolation {holder}; "
            "release that one first (this one changes nothing)",
        )
        self.audit("isolation_rejected", "rejected", holder=holder)
        return self.fail(error, phase=REJECTED)

    def contain(self, network: NetworkIsolation) -> bool:
        """Create (or converge) the deny-all policy: the first write, so containment does not wait on anything.
        Returns whether it wrote."""
        desired = build_network_policy(
            network, namespace=self.namespace, owner=owner_reference(self.body, block_owner_deletion=False)
        )
        api = kube.networking()
        try:
            api.create_namespaced_network_policy(self.namespace, desired, field_manager=FIELD_MANAGER)
        except ApiException as error:
            if error.status != 409:
                raise
            current = api.read_namespaced_network_policy(POLICY_NAME, self.namespace)
            owners = [o for o in current.metadata.owner_references or [] if o.kind == KIND]
            if owners and owners[0].uid != self.uid:
                # Another isolation got here first (the listing cannot order two created at once) or is
                # still releasing: try again shortly, when the listing decides or the policy is gone.
                raise RunbookError(
                    "AlreadyIsolated",
                    f"NetworkPolicy {POLICY_NAME} belongs to EmergencyIsolation {owners[0].name}",
                    retry_after=5,
                ) from None
            current_spec = kube.api_client().sanitize_for_serialization(current.spec)
            if owners and current_spec == desired["spec"]:
                return False
            # A hand-made emergency-isolate (the runbook's script) is adopted; a drifted one is put back.
            desired["metadata"]["resourceVersion"] = current.metadata.resource_version
            api.replace_namespaced_network_policy(POLICY_NAME, self.namespace, desired, field_manager=FIELD_MANAGER)
            self.event("NetworkContained", f"NetworkPolicy {POLICY_NAME} set to deny all traffic")
            return True
        if self.status.get("isolatedAt"):  # deleted by hand during the isolation: put back
            self.event("NetworkContained", f"NetworkPolicy {POLICY_NAME} was missing; recreated", warning=True)
            self.audit("isolation_applied", "network_recontained", policy=POLICY_NAME)
            return True
        created = self.body["metadata"]["creationTimestamp"]
        metrics.ISOLATION_TIME_TO_CONTAIN.observe(time_to_contain(created, seen=self.seen, contained=time.time()))
        self.status.set(isolatedAt=now_rfc3339())
        self.event("NetworkContained", f"NetworkPolicy {POLICY_NAME} denies all ingress and egress")
        self.audit("isolation_applied", "network_contained", policy=POLICY_NAME)
        return True

    def admit(self, spec: EmergencyIsolationSpec) -> None:
        if self.status.get("requestedBy") is not None:
            return
        requester = requested_by(self.body["metadata"])
        self.status.set(requestedBy=requester, phase=ISOLATING)
        self.status.condition("Ready", "False", "Isolating", "isolation in progress")
        self.flush()
        self.event(
            "Admitted",
            f"incident {spec.incident_id} ({spec.severity}) requested by {requester}: {spec.reason}",
        )
        self.audit("isolation_applied", "admitted", reason=spec.reason)

    def existing_policies(self, network: NetworkIsolation) -> None:
        """Other policies still allow what they allow (policies are additive): warn, or save and remove them."""
        api = kube.networking()
        others = [p for p in api.list_namespaced_network_policy(self.namespace).items if p.metadata.name != POLICY_NAME]
        names = sorted(p.metadata.name for p in others)
        if network.override_existing_policies and others:
            self.save_policies([kube.api_client().sanitize_for_serialization(p) for p in others])
            for name in names:
                try:
                    api.delete_namespaced_network_policy(name, self.namespace)
                except ApiException as error:
                    if error.status != 404:
                        raise
            removed = sorted({*self.status.get("removedPolicies", []), *names})
            self.status.set(removedPolicies=removed)
            self.flush()
            self.event("PoliciesRemoved", f"removed NetworkPolicies {', '.join(names)}; recreated on release")
            self.audit("isolation_applied", "policies_removed", policies=names)
            names = []
        if names and names != self.status.get("existingPolicies"):
            self.event("ExistingPoliciesAllow", f"NetworkPolicies {', '.join(names)} still allow traffic", warning=True)
        self.status.set(existingPolicies=names)
        if names:
            message = (
                f"NetworkPolicies {', '.join(names)} still allow the traffic they select (policies are additive); "
                "set spec.network.overrideExistingPolicies to remove them for the isolation"
            )
            self.status.condition("ExistingPoliciesAllow", "True", "ExistingPolicies", message)
        else:
            self.status.condition("ExistingPoliciesAllow", "False", "NoOtherPolicies", "")

    def save_policies(self, policies: list[dict[str, Any]]) -> None:
        """Store the full manifests before deleting anything: release recreates them from here."""
        manifest = build_saved_policies(self.name, namespace=self.namespace, policies=policies)
        api = kube.core()
        try:
            api.create_namespaced_config_map(self.namespace, manifest, field_manager=FIELD_MANAGER)
        except ApiException as error:
            if error.status != 409:
                raise
            # Only add: a manifest saved by an earlier pass is the original and is never overwritten.
            current = api.read_namespaced_config_map(manifest["metadata"]["name"], self.namespace).data or {}
            new = {k: v for k, v in manifest["data"].items() if k not in current}
            if new:
                api.patch_namespaced_config_map(
                    manifest["metadata"]["name"], self.namespace, {"data": new}, field_manager=FIELD_MANAGER
                )

    def snapshot(self, spec: EmergencyIsolationSpec) -> list[WorkloadSnapshot]:
        """Record every workload's replicas, HPA bounds and CronJob suspend, on the workload and in status."""
        workloads = _workloads(self.namespace)
        hpas = kube.api_client().sanitize_for_serialization(
            kube.autoscaling().list_namespaced_horizontal_pod_autoscaler(self.namespace).items
        )
        previous = [WorkloadSnapshot.model_validate(s) for s in self.status.get("snapshot", [])]
        entries = snapshot_workloads(workloads, hpas, spec.scale_to_zero.keep_running, uid=self.uid, previous=previous)
        by_key = {(w["kind"], w["metadata"]["name"]): w for w in workloads}
        # Only workloads this isolation will stop carry the annotation: the others are not touched at all.
        for entry in entries if spec.scale_to_zero.enabled else []:
            workload = by_key.get((entry.kind, entry.name))
            if workload is not None and not entry.kept and recorded_snapshot(workload, uid=self.uid) is None:
                _patch_workload(
                    entry.kind, entry.name, self.namespace, annotate_patch(entry, isolation=self.name, uid=self.uid)
                )
        snapshot = [e.to_api() for e in entries]
        if snapshot != self.status.get("snapshot"):
            self.status.set(snapshot=snapshot, scaled=scaled_summary(entries, scaled=False))
            self.flush()
            stopped = sum(1 for e in entries if not e.kept)
            self.event("SnapshotRecorded", f"recorded {len(entries)} workloads ({stopped} to stop)")
            self.audit("isolation_applied", "snapshot_recorded", workloads=len(entries))
        return entries

    def preserve_evidence(self, spec: EmergencyIsolationSpec) -> None:
        """Capture evidence once; fail closed (no scaling) when it is required and cannot be captured."""
        if (self.status.get("evidence") or {}).get("key"):
            return
        self.status.set(phase=CONTAINED)
        self.flush()
        try:
            record = evidence.capture(
                self.body,
                spec.evidence,
                requester=str(self.status.get("requestedBy")),
                on_collected=lambda: self.event("EvidenceCollected", "evidence read; encrypting and uploading"),
            )
        except RunbookError as error:
            self.status.condition("EvidencePreserved", "False", error.reason, error.message)
            if spec.evidence.required:
                raise RunbookError(
                    error.reason,
                    f"{error.message} (evidence is required: nothing is scaled)",
                    # Soon: a release waits for this retry (kopf finishes the pending handler first).
                    retry_after=None if error.retry_after is None else EVIDENCE_RETRY,
                ) from None
            self.event(error.reason, f"{error.message}; continuing (evidence.required is false)", warning=True)
            return
        self.status.set(evidence=record.to_api())
        self.status.condition(
            "EvidencePreserved", "True", "Uploaded", f"{record.files} files, manifest {record.manifest_key}"
        )
        self.flush()
        self.event("EvidencePreserved", f"encrypted archive {record.key} (sha256 {record.sha256})")
        self.audit("isolation_applied", "evidence_preserved", key=record.key, sha256=record.sha256)

    def scale_to_zero(self, snapshot: list[WorkloadSnapshot]) -> None:
        current = {(w["kind"], w["metadata"]["name"]): w for w in _workloads(self.namespace)}
        stopped = []
        for entry in snapshot:
            workload = current.get((entry.kind, entry.name))
            if entry.kept or workload is None or is_stopped(entry, workload):
                continue
            _patch_workload(entry.kind, entry.name, self.namespace, stop_patch(entry))
            stopped.append(f"{entry.kind}/{entry.name}")
        self.status.set(scaled=scaled_summary(snapshot, scaled=True))
        if not snapshot:
            self.status.condition(
                "WorkloadsStopped", "False", "NoWorkloads", "the namespace has no Deployments, StatefulSets or CronJobs"
            )
            if self.status.get("phase") != ISOLATED:
                self.event("NoWorkloads", "the namespace has no workloads to stop", warning=True)
        else:
            self.status.condition("WorkloadsStopped", "True", "ScaledToZero", f"{len(snapshot)} workloads recorded")
        if stopped:
            self.event("ScaledToZero", f"stopped {', '.join(stopped)}")
            self.audit("isolation_applied", "scaled_to_zero", workloads=stopped)

    # --- release ---------------------------------------------------------------------------------------

    def release(self) -> None:
        """Recreate removed policies, restore each workload exactly (unless changed by hand), drop the policy."""
        phase = self.status.get("phase")
        if phase in (RELEASED, REJECTED):
            return
        self.status.set(phase="Releasing")
        self.flush()
        recreated = self.recreate_policies()
        warnings = self.restore_workloads()
        self.remove_policy()
        self.status.set(
            phase=RELEASED,
            releasedAt=now_rfc3339(),
            scaled=scaled_summary(
                [WorkloadSnapshot.model_validate(s) for s in self.status.get("snapshot", [])], scaled=False
            ),
        )
        if warnings:
            self.status.condition("Restored", "False", "ChangedDuringIsolation", "; ".join(warnings))
            self.event("ChangedDuringIsolation", "; ".join(warnings), warning=True)
        else:
            self.status.condition("Restored", "True", "Exact", "every workload is back to its recorded state")
        self.status.condition("Ready", "True", "Released", "the namespace is released")
        self.flush()
        self.event("Released", f"released; recreated policies: {', '.join(recreated) or 'none'}")
        self.audit("isolation_released", "released", recreatedPolicies=recreated, warnings=warnings)
        metrics.ISOLATIONS_ACTIVE.labels(self.namespace).set(0)
        spec = self.body.get("spec") or {}
        metrics.ISOLATION_INFO.remove(self.namespace, self.name, spec.get("incidentId", ""), spec.get("severity", "P1"))

    def recreate_policies(self) -> list[str]:
        api, name = kube.core(), saved_policies_name(self.name)
        try:
            data = api.read_namespaced_config_map(name, self.namespace).data
        except ApiException as error:
            if error.status != 404:
                raise
            return []
        names = []
        for manifest in saved_policies(data):
            try:
                kube.networking().create_namespaced_network_policy(
                    self.namespace, manifest, field_manager=FIELD_MANAGER
                )
            except ApiException as error:
                if error.status != 409:  # recreated by an earlier pass
                    raise
            names.append(manifest["metadata"]["name"])
        api.delete_namespaced_config_map(name, self.namespace)
        return names

    def restore_workloads(self) -> list[str]:
        """Each workload still carrying this isolation's annotation gets its recorded state back."""
        warnings = []
        current = {(w["kind"], w["metadata"]["name"]): w for w in _workloads(self.namespace)}
        for entry in self.status.get("snapshot", []):
            if not entry.get("kept") and (entry["kind"], entry["name"]) not in current:
                warnings.append(f"{entry['kind']} {entry['name']} was deleted during the isolation")
        restored = []
        for (kind, name), workload in sorted(current.items()):
            entry = recorded_snapshot(workload, uid=self.uid)
            if entry is None:
                continue  # not ours, kept running, or restored by an earlier pass
            untouched = is_stopped(entry, workload)
            now = workload_state(entry, workload)
            if not untouched and now != recorded_state(entry):  # (equal: never stopped, e.g. evidence failed)
                warnings.append(f"{kind} {name} was changed by hand during the isolation (now {now}); left as is")
            _patch_workload(kind, name, self.namespace, restore_patch(entry, restore_spec=untouched))
            restored.append(f"{kind}/{name}")
        if restored:
            self.event("WorkloadsRestored", f"restored {', '.join(restored)}")
            self.audit("isolation_released", "workloads_restored", workloads=restored)
        return warnings

    def remove_policy(self) -> None:
        api = kube.networking()
        try:
            current = api.read_namespaced_network_policy(POLICY_NAME, self.namespace)
        except ApiException as error:
            if error.status != 404:
                raise
            return
        if any(o.uid == self.uid for o in current.metadata.owner_references or []):
            api.delete_namespaced_network_policy(POLICY_NAME, self.namespace)
            self.audit("isolation_released", "network_released", policy=POLICY_NAME)


@contextmanager
def _reported(isolation: Isolation) -> Iterator[None]:
    """Any failure of a pass (an API refusal nobody foresaw too) as Ready=False and a retry with backoff."""
    try:
        yield
    except (kopf.TemporaryError, kopf.PermanentError):
        raise
    except Exception as raised:
        raise isolation.fail(raised) from None


def time_to_contain(creation_timestamp: str, *, seen: float, contained: float) -> float:
    """Seconds from an EmergencyIsolation's creation to its NetworkPolicy being created (Unix times).

    ``creationTimestamp`` has whole seconds: the object was created somewhere in [ts, ts + 1). When the operator
    got the object within that second (``seen``: a watch delivers a new object in milliseconds), the clock
    starts at ``seen``, which leaves out only the watch's delivery and kopf's finalizer write; otherwise (the
    operator was down or busy) at ``ts``, which may count up to 1 s too much of a longer wait."""
    start = datetime.fromisoformat(creation_timestamp.replace("Z", "+00:00")).timestamp()
    if start <= seen < start + 1:
        start = seen
    return max(0.0, contained - start)


def reconcile(body: kopf.Body, *, retry: int = 0) -> None:
    """Create, resume and spec changes: isolate, or release when spec.released is true."""
    isolation = Isolation(body, retry=retry)
    with _reported(isolation):
        if isolation.body["spec"].get("released"):
            isolation.release()
        else:
            isolation.isolate()


def guard(body: kopf.Body) -> None:
    """Periodically, while isolated: put the deny-all policy back if someone removed or changed it."""
    isolation = Isolation(body)
    with _reported(isolation):
        _guard(isolation)


def _guard(isolation: Isolation) -> None:
    if isolation.status.get("phase") != ISOLATED or isolation.body["spec"].get("released"):
        return
    spec = parse_spec(EmergencyIsolationSpec, isolation.body["spec"])
    if spec.network.isolate and isolation.contain(spec.network):
        # Timers run beside the change handlers: if a release began meanwhile, it may already have removed
        # the policy this just wrote. Release marks itself before removing, so checking after writing closes
        # the race.
        fresh = kube.custom().get_namespaced_custom_object(GROUP, VERSION, isolation.namespace, PLURAL, isolation.name)
        if (
            fresh.get("status", {}).get("phase") != ISOLATED
            or fresh.get("spec", {}).get("released")
            or fresh["metadata"].get("deletionTimestamp")
        ):
            isolation.remove_policy()


def release_deleted(body: kopf.Body, *, retry: int = 0) -> None:
    """Deletion: release (the finalizer holds the object until this returns, also across operator downtime)."""
    isolation = Isolation(body, retry=retry)
    with _reported(isolation):
        isolation.release()
