"""EmergencyIsolation: "Suspected Data Breach", "Scale to Zero" and "Restore Service"."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from .common import CamelModel, LabelSelector, LabelSelectorRequirement, StatusBase, StatusModel, cel
from .sources import Encryption, S3Location

CIDR = r"^([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}$|^[0-9a-fA-F:]+/[0-9]{1,3}$"
# Label keys ([prefix/]name) and values, as Kubernetes validates them.
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}$")
LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")


class NetworkIsolation(CamelModel):
    """The deny-all NetworkPolicy."""

    isolate: bool = Field(True, description="Create the deny-all NetworkPolicy emergency-isolate.")
    allow_dns: bool = Field(False, alias="allowDNS", description="Still allow DNS lookups (UDP/TCP 53) to kube-system.")
    allow_egress_to: list[str] = Field(
        default_factory=list,
        description="CIDRs egress is still allowed to (e.g. the SIEM).",
        json_schema_extra={"items": {"type": "string", "pattern": CIDR}},
    )
    override_existing_policies: bool = Field(
        False,
        description="Remove the namespace's other NetworkPolicies (saved, recreated on release); "
        "otherwise they are listed with a warning, since policies are additive.",
    )


def _database_and_cache() -> LabelSelector:
    return LabelSelector(
        match_expressions=[LabelSelectorRequirement(key="app", operator="In", values=["postgresql", "redis"])]
    )


class ScaleToZero(CamelModel):
    """Stopping the application."""

    enabled: bool = Field(True, description="Scale Deployments and StatefulSets to zero and suspend CronJobs.")
    keep_running: LabelSelector = Field(
        default_factory=_database_and_cache,
        description="Workloads left running (default: app in (postgresql, redis), the database and cache).",
    )

    @model_validator(mode="after")
    def _check_label_syntax(self) -> ScaleToZero:
        # The API server cannot check label syntax inside a custom resource; a selector it would reject on
        # a real object must not silently match nothing (and so scale the database to zero).
        selector = self.keep_running
        for key, value in selector.match_labels.items():
            if not LABEL_KEY.match(key) or not LABEL_VALUE.match(value):
                raise ValueError(f"keepRunning.matchLabels: {key!r}: {value!r} is not a valid label")
        for index, expr in enumerate(selector.match_expressions):
            if not LABEL_KEY.match(expr.key):
                raise ValueError(f"keepRunning.matchExpressions[{index}].key: {expr.key!r} is not a valid label key")
            for value in expr.values:
                if not LABEL_VALUE.match(value):
                    raise ValueError(
                        f"keepRunning.matchExpressions[{index}].values: {value!r} is not a valid label value"
                    )
        return self


class EvidenceCapture(CamelModel):
    """Forensic evidence collected before anything is scaled."""

    capture: bool = Field(True, description="Collect pod specs, Events, ReplicaSets and container logs.")
    required: bool = Field(True, description="Fail closed: do not scale when capture fails.")
    destination: S3Location | None = Field(None, description="Where the encrypted evidence archive goes.")
    encryption: Encryption | None = Field(None, description="How the archive is encrypted.")


class EmergencyIsolationSpec(CamelModel):
    """Contain a namespace during a suspected breach; release it exactly."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(oldSelf.released) || !oldSelf.released || (has(self.released) && self.released)",
                "released cannot be undone: create a new EmergencyIsolation to isolate again",
            ),
            (
                "has(self.scaleToZero) == has(oldSelf.scaleToZero)"
                " && (!has(self.scaleToZero) || self.scaleToZero == oldSelf.scaleToZero)",
                "scaleToZero is immutable: the snapshot was taken with it",
            ),
            (
                "has(self.evidence) == has(oldSelf.evidence)"
                " && (!has(self.evidence) || self.evidence == oldSelf.evidence)",
                "evidence is immutable: it may already be preserved",
            ),
        )
    )

    reason: str = Field(description="Why the namespace is isolated.", min_length=1, max_length=1024)
    incident_id: str = Field(
        description="The incident's identifier, e.g. INC-2026-0042.",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
    )
    severity: Literal["P1", "P2", "P3", "P4"] = Field("P1", description="Incident severity (the runbook's levels).")
    network: NetworkIsolation = Field(default_factory=NetworkIsolation, description="Network containment.")
    scale_to_zero: ScaleToZero = Field(default_factory=ScaleToZero, description="Stopping workloads.")
    evidence: EvidenceCapture = Field(default_factory=EvidenceCapture, description="Evidence preservation.")
    released: bool = Field(False, description="Set true to release (or delete the resource).")


class WorkloadSnapshot(StatusModel):
    """A workload's state before isolation."""

    kind: str = Field(description="Deployment, StatefulSet or CronJob.")
    name: str = Field(description="Name.")
    kept: bool = Field(False, description="Left running (matched spec.scaleToZero.keepRunning).")
    replicas: int | None = Field(None, description="Replicas before isolation.")
    suspend: bool | None = Field(None, description="CronJob suspend before isolation.")
    hpa: str | None = Field(None, description="Name of an HPA targeting it.")
    hpa_min_replicas: int | None = Field(None, description="The HPA's minReplicas before isolation.")
    hpa_max_replicas: int | None = Field(None, description="The HPA's maxReplicas before isolation.")


class EvidenceRecord(StatusModel):
    """The stored evidence archive."""

    key: str | None = Field(None, description="Object key of the encrypted archive.")
    sha256: str | None = Field(None, description="SHA-256 of the encrypted archive.")
    manifest_key: str | None = Field(None, description="Object key of the custody manifest.")
    files: int | None = Field(None, description="Number of files in the archive.")
    captured_at: str | None = Field(None, description="When the archive was committed (manifest written).")


class SavedPolicy(StatusModel):
    """A NetworkPolicy removed for the isolation, as it was; in status, which only the operator writes."""

    name: str = Field(description="The NetworkPolicy's name.")
    manifest: str = Field(
        description="Its manifest as JSON: name, namespace, labels, annotations and spec (checked again on release)."
    )


class IsolationPhase(enum.StrEnum):
    """Where an EmergencyIsolation is: admitted, contained (evidence next), isolated; releasing, released; or
    refused (a second one in the namespace) or invalid (never acted on)."""

    ISOLATING = "Isolating"
    CONTAINED = "Contained"
    ISOLATED = "Isolated"
    RELEASING = "Releasing"
    RELEASED = "Released"
    REJECTED = "Rejected"
    INVALID = "Invalid"


class EmergencyIsolationStatus(StatusBase):
    """Observed state of an EmergencyIsolation."""

    phase: IsolationPhase | None = Field(None, description="A one-word summary of the state.")

    requested_by: str | None = Field(None, description="Who created the isolation.")
    isolated_at: str | None = Field(None, description="When the network was contained.")
    released_at: str | None = Field(None, description="When the isolation was released.")
    scaled: str | None = Field(None, description="Workloads scaled to zero, as n/m.")
    snapshot: list[WorkloadSnapshot] = Field(default_factory=list, description="State before isolation.")
    existing_policies: list[str] = Field(
        default_factory=list, description="Other NetworkPolicies present, which still allow what they allow."
    )
    removed_policies: list[str] = Field(
        default_factory=list, description="NetworkPolicies removed (overrideExistingPolicies); recreated on release."
    )
    saved_policies: list[SavedPolicy] = Field(
        default_factory=list,
        description="The removed NetworkPolicies' manifests, saved before removal; after release, those that "
        "could not be recreated (PoliciesRestored=False names them).",
    )
    evidence: EvidenceRecord | None = Field(None, description="The preserved evidence.")


# Phases of an EmergencyIsolation that hold nothing: released, refused (a second one), or never acted on.
INACTIVE_PHASES = {IsolationPhase.RELEASED, IsolationPhase.REJECTED, IsolationPhase.INVALID}


def is_active(item: Mapping[str, Any]) -> bool:
    """Whether an EmergencyIsolation (as the API returns it) may hold its namespace."""
    released = (item.get("spec") or {}).get("released", False)
    phase = (item.get("status") or {}).get("phase")
    return not released and phase not in INACTIVE_PHASES and not item["metadata"].get("deletionTimestamp")


def holding_isolation(items: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """Of a namespace's EmergencyIsolations, the one that holds it, or None.

    Of several active ones, the one that has already acted holds it, else the oldest (ties by name), so
    that two created at the same moment agree on which of them proceeds.
    """
    active = [item for item in items if is_active(item)]
    if not active:
        return None
    return min(
        active,
        key=lambda item: (
            (item.get("status") or {}).get("phase") is None,
            item["metadata"].get("creationTimestamp", ""),
            item["metadata"]["name"],
        ),
    )
