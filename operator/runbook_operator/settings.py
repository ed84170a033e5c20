"""Operator settings from the environment, and how they configure kopf."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, model_validator

if TYPE_CHECKING:
    import kopf

PREFIX = "runbook.dev"
FINALIZER = f"{PREFIX}/finalizer"
MANAGED_BY = {"app.kubernetes.io/managed-by": "runbook-operator"}
FIELD_MANAGER = "runbook-operator"


class Settings(BaseModel):
    """Everything configurable, read from ``RUNBOOK_*`` environment variables."""

    namespaces: list[str] = Field(default_factory=list, description="Namespaces to watch; all when empty.")
    agent_image: str = Field(
        "ghcr.io/runbook-dev/runbook-operator:0.1.0",
        description="Image of the backup/restore agent (normally the operator's own).",
    )
    metrics_port: int = Field(9090, description="Port of the Prometheus endpoint (0 disables it).")
    health_port: int = Field(8080, description="Port of the liveness endpoint (0 disables it).")
    max_workers: int = Field(20, description="Handlers run concurrently at most.")
    watch_timeout: int = Field(300, description="Server-side timeout of a watch request, seconds.")
    event_level: str = Field("INFO", description="Lowest log level posted as a Kubernetes Event.")
    containment_watch: bool = Field(
        True, description="Contain new EmergencyIsolations from a watch of their own, off kopf's queues."
    )
    # Leader election (leader.py): with more than one replica, only the holder of the Lease runs handlers.
    leader_election: bool = Field(False, description="Act only while holding the Lease (replicas > 1).")
    lease_name: str = Field("runbook-operator", description="The Lease's name: one per shard of namespaces.")
    lease_namespace: str = Field(
        "", description="The Lease's namespace: the operator's own (POD_NAMESPACE, else the pod's service account's)."
    )
    lease_duration: float = Field(15.0, gt=0, description="Seconds a standby waits on an unrenewed Lease.")
    lease_renew_deadline: float = Field(10.0, gt=0, description="Seconds the leader may fail to renew, then exits.")
    lease_retry_period: float = Field(2.0, gt=0, description="Seconds between renewals and between standby polls.")

    @model_validator(mode="after")
    def _lease_timings(self) -> Settings:
        # The leader must be gone before a standby can take the Lease: it exits once renewing failed for the
        # renew deadline (checked every retry period at most), and a standby takes the Lease only after it saw
        # no renewal for the whole duration.
        retry, deadline, duration = self.lease_retry_period, self.lease_renew_deadline, self.lease_duration
        if not (retry < deadline and deadline + retry <= duration):
            raise ValueError(
                "RUNBOOK_LEASE_RETRY_PERIOD < RUNBOOK_LEASE_RENEW_DEADLINE and RUNBOOK_LEASE_RENEW_DEADLINE + "
                f"RUNBOOK_LEASE_RETRY_PERIOD <= RUNBOOK_LEASE_DURATION must hold (got {retry}, {deadline}, {duration})"
            )
        return self

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        values: dict[str, object] = {}
        if env.get("RUNBOOK_NAMESPACES"):
            values["namespaces"] = [n.strip() for n in env["RUNBOOK_NAMESPACES"].split(",") if n.strip()]
        for field in cls.model_fields.keys() - {"namespaces"}:  # namespaces: comma-separated, above
            name = f"RUNBOOK_{field.upper()}"
            if name in env:
                values[field] = env[name]
        return cls.model_validate(values)


# Threads that call out besides the workers: the containment path's own pool (runtime.CONTAINMENT) and
# evidence's parallel log reads (evidence.LOG_WORKERS, 8).
CONTAINMENT_WORKERS = 16
POOL_HEADROOM = CONTAINMENT_WORKERS + 8


def connection_pool_size() -> int:
    """Connections per host a shared client (Kubernetes, S3) keeps open: every worker (``RUNBOOK_MAX_WORKERS``)
    plus POOL_HEADROOM, so no worker's connection is made for one request and thrown away ("Connection pool is
    full")."""
    return Settings.from_env().max_workers + POOL_HEADROOM


def agent_image() -> str:
    """The image of the backup/restore agent pods (``RUNBOOK_AGENT_IMAGE``), as the environment says now."""
    return Settings.from_env().agent_image


def configure_kopf(settings: kopf.OperatorSettings, ours: Settings) -> None:
    """Our prefixes for finalizers and bookkeeping annotations, bounded workers, watch timeouts, Events."""
    import kopf  # here, not at the top: builders import this module's constants and must not load kopf

    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.execution.max_workers = ours.max_workers
    settings.watching.server_timeout = ours.watch_timeout
    settings.watching.client_timeout = ours.watch_timeout + 30
    settings.posting.level = logging.getLevelName(ours.event_level.upper())
    settings.posting.enabled = True
