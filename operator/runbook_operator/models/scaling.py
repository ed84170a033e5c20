"""ScalingProfile: the runbook's "Scaling Procedures"."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from .common import (
    CamelModel,
    Cron,
    Duration,
    ObjectName,
    Quantity,
    StatusBase,
    StatusModel,
    TimeZone,
    WorkloadRef,
    cel,
    parse_quantity,
)

_MIN_LE_MAX = cel(
    ("self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas"),
)


def _check_min_max(min_replicas: int, max_replicas: int, where: str) -> None:
    if min_replicas > max_replicas:
        raise ValueError(f"{where}: minReplicas ({min_replicas}) must not exceed maxReplicas ({max_replicas})")


class ScalingRules(CamelModel):
    """HPA scaling behaviour in one direction."""

    stabilization_window_seconds: int | None = Field(None, description="Look-back window.", ge=0, le=3600)
    max_percent_per_minute: int | None = Field(None, description="At most this % change per minute.", ge=1)
    max_pods_per_minute: int | None = Field(None, description="At most this many pods per minute.", ge=1)


class Behavior(CamelModel):
    """HPA behaviour."""

    scale_up: ScalingRules | None = Field(None, description="Scaling up.")
    scale_down: ScalingRules | None = Field(None, description="Scaling down.")


class Autoscaling(CamelModel):
    """A HorizontalPodAutoscaler's bounds and targets (the runbook: 2..10, CPU 70 %, memory 80 %)."""

    model_config = ConfigDict(json_schema_extra=_MIN_LE_MAX)

    min_replicas: int = Field(2, description="Fewest replicas.", ge=1, le=1000)
    max_replicas: int = Field(10, description="Most replicas.", ge=1, le=1000)
    cpu_utilization: int | None = Field(
        70, description="Target average CPU utilization (% of requests).", ge=1, le=1000
    )
    memory_utilization: int | None = Field(
        80, description="Target average memory utilization (% of requests).", ge=1, le=1000
    )
    behavior: Behavior | None = Field(None, description="Scaling speed limits.")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        _check_min_max(self.min_replicas, self.max_replicas, "autoscaling")
        return self


class ResourceList(CamelModel):
    """CPU and memory quantities."""

    cpu: Quantity | None = Field(None, description="CPU, e.g. 500m or 2.")
    memory: Quantity | None = Field(None, description="Memory, e.g. 512Mi or 1Gi.")


class ContainerResources(CamelModel):
    """Requests and limits of one container."""

    container: str = Field(description="Container name in the pod template.", min_length=1)
    requests: ResourceList | None = Field(None, description="Requests.")
    limits: ResourceList | None = Field(None, description="Limits.")

    @model_validator(mode="after")
    def _requests_within_limits(self) -> ContainerResources:
        if self.requests is None or self.limits is None:
            return self
        for name in ("cpu", "memory"):
            req, lim = getattr(self.requests, name), getattr(self.limits, name)
            if req is not None and lim is not None and parse_quantity(req) > parse_quantity(lim):
                raise ValueError(f"container {self.container}: requests.{name} ({req}) exceeds limits.{name} ({lim})")
        return self


class ScalingWindow(CamelModel):
    """Bounds that apply for a while after each cron start (e.g. business hours)."""

    model_config = ConfigDict(json_schema_extra=_MIN_LE_MAX)

    name: str = Field(description="Window name.", min_length=1, max_length=63)
    start: Cron = Field(description="When the window opens (cron).")
    duration: Duration = Field(description="How long it stays open, e.g. 10h.")
    time_zone: TimeZone = Field("UTC", description="Time zone of start.")
    min_replicas: int = Field(description="Fewest replicas during the window.", ge=1, le=1000)
    max_replicas: int = Field(description="Most replicas during the window.", ge=1, le=1000)

    @model_validator(mode="after")
    def _bounds(self) -> ScalingWindow:
        _check_min_max(self.min_replicas, self.max_replicas, f"windows[{self.name}]")
        return self


class Override(CamelModel):
    """Pin the replica count until a time (e.g. a launch or an incident).

    At least 1: it pins the HPA's bounds, and an HPA cannot go below one replica. Stopping a workload is
    an EmergencyIsolation's scale-to-zero, which also pauses the profile.
    """

    replicas: int = Field(description="Replicas to pin (HPA min = max), at least 1.", ge=1, le=1000)
    until: datetime = Field(description="When the override ends (RFC 3339).")
    reason: str = Field(description="Why.", min_length=1, max_length=1024)


_TIMING_NEEDS_AUTOSCALING = cel(
    (
        "has(self.autoscaling) || ((!has(self.windows) || size(self.windows) == 0) && !has(self.override))",
        "windows and override adjust the HPA's bounds: they need autoscaling",
    ),
)


class ScalingProfileSpec(CamelModel):
    """How one workload scales."""

    model_config = ConfigDict(json_schema_extra=_TIMING_NEEDS_AUTOSCALING)

    target_ref: WorkloadRef = Field(
        description="The Deployment or StatefulSet (immutable: the recorded originals belong to it).",
        json_schema_extra=cel(
            ("self == oldSelf", "targetRef is immutable: create another ScalingProfile"),
        ),
    )
    autoscaling: Autoscaling | None = Field(None, description="Horizontal autoscaling.")
    resources: list[ContainerResources] = Field(default_factory=list, description="Per-container resources.")
    windows: list[ScalingWindow] = Field(default_factory=list, description="Scheduled bounds.")
    override: Override | None = Field(None, description="A temporary fixed replica count.")
    adopt_existing: bool = Field(False, description="Take over an HPA that already targets the workload.")
    on_delete: Literal["Restore", "Keep"] = Field(
        "Restore", description="On deletion, put back the original resources and HPA (Restore) or leave all."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ScalingProfileSpec:
        if self.autoscaling is None and (self.windows or self.override is not None):
            raise ValueError("windows and override adjust the HPA's bounds: they need autoscaling")
        for what, names in (
            ("resources", [r.container for r in self.resources]),
            ("windows", [w.name for w in self.windows]),
        ):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"{what}: {', '.join(duplicates)} listed more than once")
        return self


class OriginalResources(StatusModel):
    """A container's resources as they were before the profile."""

    container: str = Field(description="Container name.")
    requests: dict[str, str] = Field(default_factory=dict, description="Original requests.")
    limits: dict[str, str] = Field(default_factory=dict, description="Original limits.")


class ScalingPhase(enum.StrEnum):
    """What a ScalingProfile is doing."""

    ACTIVE = "Active"  # the workload and its HPA follow the profile
    PAUSED = "Paused"  # an EmergencyIsolation holds the namespace: nothing is scaled until it is released


class ScalingProfileStatus(StatusBase):
    """Observed state of a ScalingProfile."""

    phase: ScalingPhase | None = Field(None, description="Active, or Paused while an isolation holds the namespace.")
    hpa_name: str | None = Field(None, description="The owned HPA.")
    min_replicas: int | None = Field(None, description="Effective minReplicas.")
    max_replicas: int | None = Field(None, description="Effective maxReplicas.")
    active_window: str | None = Field(None, description="The window in force, if any.")
    next_transition: str | None = Field(None, description="When the bounds next change.")
    original_resources: list[OriginalResources] = Field(
        default_factory=list, description="Container resources before the profile changed them."
    )
    target: ObjectName | None = Field(None, description="The target workload's name.")
    override_until: str | None = Field(None, description="While an override pins the bounds: when it ends.")
    adopted_hpa_spec: str | None = Field(
        None, description="The spec (JSON) of an adopted HPA as it was before the profile, for restore."
    )
