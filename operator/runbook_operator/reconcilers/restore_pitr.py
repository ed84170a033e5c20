"""BackupRestore with ``spec.pointInTime``: a PostgreSQL server recovered to a moment of its policy's WAL archive.

- **Preflight** (in the operator, read-only; no verify Job: the restore Job verifies every object before it
  writes): the policy must archive WAL (``spec.wal``); the catalog of its bucket (signed manifests only,
  ``wal_catalog.read_catalog``) must hold a base backup before the target and a contiguous chain of WAL from
  it through the target: a target in the future, before the window, after the newest WAL or across a gap is
  refused naming ``spec.pointInTime.targetTime`` / ``targetLSN`` and the window or the missing range. InPlace:
  the StatefulSet and its claim must exist; NewVolume: the claim must not. The choice is pinned in status.
- **ScaleDown** (InPlace): the StatefulSet through the shared step (its exact count recorded first).
- **Restore**: NewVolume creates the claim; the Job (``runbook-operator restore-pitr``) mounts it.
- **Check**: with the source's login, the recovered server (InPlace, once scaled up, or any reachable one at
  the policy's source address) must answer and not be in recovery; ``status.pointInTime.recoveredTime``
  records its newest replayed commit. NewVolume records the claim only.
- **ScaleUp** (InPlace): the recorded count back, through the shared step.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg

from ..agent.restore import connect_target
from ..builders.pitr import build_claim, build_pitr_job, build_pitr_plan, claim_name, run_as
from ..clients import kube
from ..errors import RunbookError
from ..models.backup import PointInTime, PointInTimeStatus, RestoreStepName
from ..models.plans import PointInTimePlan, format_lsn, parse_lsn
from ..settings import agent_image
from . import restore as shared
from . import wal_catalog
from .catalog import S3_CREDENTIALS_FIELD, s3_client
from .jobs import job_summary
from .restore import POLL_SECONDS, Outcome, Restore
from .runtime import Result
from .wal_catalog import LATEST_FIELD, LSN_FIELD, TIME_FIELD, Choice, WALCatalog

PVCS = kube.Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
STATEFUL_SET = "StatefulSet"


def target_of(point: PointInTime) -> tuple[datetime | None, int | None, str]:
    """(time, LSN, the field) of the requested point; ``InvalidSpec`` naming the field when it does not parse."""
    if point.target_time is not None:
        try:
            moment = wal_catalog.parse_time(point.target_time)
        except ValueError:
            raise RunbookError("InvalidSpec", f"{TIME_FIELD}: {point.target_time!r} is not an RFC 3339 time") from None
        return moment, None, TIME_FIELD
    if point.target_lsn is not None:
        try:
            return None, parse_lsn(point.target_lsn), LSN_FIELD
        except ValueError:
            raise RunbookError("InvalidSpec", f"{LSN_FIELD}: {point.target_lsn!r} is not a WAL location") from None
    return None, None, LATEST_FIELD


def describe_window(catalog: WALCatalog) -> str:
    window = catalog.window()
    if window is None:
        return "the archive has no recoverable window yet"
    return (
        f"the recoverable window is {wal_catalog.rfc3339(window.earliest_time)} ({format_lsn(window.earliest_lsn)}) "
        f"to {wal_catalog.rfc3339(window.latest_time)} ({format_lsn(window.latest_lsn)})"
    )


def choose(catalog: WALCatalog, point: PointInTime, *, now: datetime) -> Choice:
    """The catalog's choice for the point; its refusal (which names the field and the missing range) with the
    window appended."""
    moment, lsn, _ = target_of(point)
    try:
        if moment is not None:
            return catalog.choose(target_time=moment, now=now)
        if lsn is not None:
            return catalog.choose(target_lsn=lsn, now=now)
        return catalog.choose(latest=True, now=now)
    except RunbookError as error:
        raise RunbookError(error.reason, f"{error.message}; {describe_window(catalog)}") from None


class PointInTimeTarget:
    """A point-in-time recovery of the policy's PostgreSQL server from its WAL archive."""

    source = "postgresql"

    def __init__(self, restore: Restore) -> None:
        self.restore = restore

    @property
    def point(self) -> PointInTime:
        point = self.restore.spec.point_in_time
        assert point is not None  # dispatched on it
        return point

    @property
    def in_place(self) -> bool:
        return self.point.mode == "InPlace"

    def steps(self, dry_run: bool) -> tuple[RestoreStepName, ...]:
        """InPlace checks the recovered server once the StatefulSet is back: Check after ScaleUp."""
        if dry_run:
            return (RestoreStepName.PREFLIGHT,)
        if self.in_place:
            return (
                RestoreStepName.PREFLIGHT,
                RestoreStepName.SCALE_DOWN,
                RestoreStepName.RESTORE,
                RestoreStepName.SCALE_UP,
                RestoreStepName.CHECK,
            )
        return (RestoreStepName.PREFLIGHT, RestoreStepName.RESTORE, RestoreStepName.CHECK)

    # --- preflight -------------------------------------------------------------------------------------

    def catalog(self) -> WALCatalog:
        restore = self.restore
        policy, spec = restore.policy, restore.spec
        if policy.wal is None:
            raise RunbookError(
                "NoWALArchive",
                f"spec.pointInTime: BackupPolicy {spec.policy_ref} archives no WAL (its spec.wal is not set)",
            )
        location = policy.destination.s3
        client = s3_client(restore.api, restore.namespace, location, field=S3_CREDENTIALS_FIELD)
        return wal_catalog.read_catalog(
            client, location, namespace=restore.namespace, policy=spec.policy_ref, signing_key=restore.manifest_key
        )

    def choice(self) -> tuple[Choice, WALCatalog, PointInTimePlan]:
        """The catalog's choice for the point, recorded in ``status.pointInTime``, and the Job's plan."""
        restore = self.restore
        catalog = self.catalog()
        choice = choose(catalog, self.point, now=restore.ctx.now().astimezone(UTC))
        plan = build_pitr_plan(
            restore.policy,
            choice,
            self.point,
            restore=restore.name,
            namespace=restore.namespace,
            policy_name=restore.spec.policy_ref,
        )
        segments = choice.segments
        restore.status.backup_key = choice.base.key
        restore.status.backup_time = wal_catalog.rfc3339(choice.base.stop_time)
        restore.status.point_in_time = PointInTimeStatus(
            target=choice.target,
            base_backup=choice.base.folder,
            base_backup_stop_lsn=format_lsn(choice.base.stop),
            segments=len(segments),
            first_segment=segments[0].name if segments else None,
            last_segment=segments[-1].name if segments else None,
            volume_claim=claim_name(self.point),
            previous_data_directory=plan.keep_previous_as,
        )
        return choice, catalog, plan

    def preflight_in_operator(self) -> str:
        """Everything but the bytes, changing nothing (the Job checks every object before it writes)."""
        restore = self.restore
        spec, policy = restore.spec, restore.policy
        if policy.source.postgresql is None:
            raise RunbookError(
                "NotRestorable",
                f"spec.pointInTime: BackupPolicy {spec.policy_ref} backs up {policy.source.kind}, not PostgreSQL",
            )
        if spec.target is not None:
            raise RunbookError(
                "InvalidSpec",
                "spec.target: a point-in-time restore recovers the policy's server itself (spec.pointInTime), "
                "not a database",
            )
        restore.decryptable()
        restore.storage_secrets()
        point = self.point
        claim = claim_name(point)
        if self.in_place:
            if restore.workload(STATEFUL_SET, point.stateful_set) is None:
                raise RunbookError(
                    "WorkloadNotFound", f"spec.pointInTime.statefulSet: StatefulSet {point.stateful_set} not found"
                )
            if restore.api.get(PVCS, restore.namespace, claim) is None:
                field = "spec.pointInTime.volumeClaim"
                raise RunbookError("VolumeClaimNotFound", f"{field}: PersistentVolumeClaim {claim} not found")
        elif restore.api.get(PVCS, restore.namespace, claim) is not None:
            raise RunbookError(
                "VolumeClaimExists",
                f"spec.pointInTime.newVolume.name: PersistentVolumeClaim {claim} exists; name a new one",
            )
        restore.workloads_found()
        choice, catalog, _ = self.choice()
        restore.status.target = f"PersistentVolumeClaim {claim}, {point.data_directory}"
        segments = choice.segments
        message = (
            f"{choice.target}: base backup {choice.base.folder} (consistent at {format_lsn(choice.base.stop)}) and "
            f"{len(segments)} contiguous WAL segments"
            + (f" {segments[0].name}..{segments[-1].name}" if segments else "")
            + f"; {describe_window(catalog)}"
        )
        restore.ctx.event("Normal", "PreflightPassed", message)
        return message

    # --- restore ---------------------------------------------------------------------------------------

    def job(self) -> tuple[dict[str, Any], str]:
        """The Job (NewVolume: after creating the claim). The choice is made again from the bucket as it is now
        (the same target: a ``latest`` gets the WAL shipped since the preflight)."""
        restore = self.restore
        point = self.point
        _, _, plan = self.choice()
        claim = claim_name(point)
        identity: dict[str, int] = {}
        if self.in_place:
            identity = run_as(restore.workload(STATEFUL_SET, point.stateful_set))
        else:
            assert point.new_volume is not None
            if not restore.api.create(PVCS, restore.namespace, build_claim(restore.ctx.body, point.new_volume)):
                raise RunbookError(
                    "VolumeClaimExists",
                    f"spec.pointInTime.newVolume.name: PersistentVolumeClaim {claim} was created meanwhile",
                )
            restore.ctx.event(
                "Normal", "VolumeClaimCreated", f"PersistentVolumeClaim {claim} ({point.new_volume.size})"
            )
        job = build_pitr_job(
            restore.ctx.body,
            plan,
            policy=restore.policy,
            spec=restore.spec,
            claim=claim,
            image=agent_image(),
            identity=identity,
        )
        status = restore.status.point_in_time or PointInTimeStatus()
        return job, (
            f"Job {job['metadata']['name']} recovers {claim} ({plan.data_directory}) from {plan.base_key} and "
            f"{status.segments} WAL segments to {status.target}"
        )

    def job_done(self, name: str, pods: list[dict[str, Any]]) -> str:
        figures = job_summary(pods, "restore-pitr") or {}
        status = self.restore.status.point_in_time or PointInTimeStatus()
        status.previous_data_directory = figures.get("previousDataDirectory") or None
        if isinstance(figures.get("segments"), int):
            status.segments = figures["segments"]
            status.first_segment = figures.get("firstSegment")
            status.last_segment = figures.get("lastSegment")
        self.restore.status.point_in_time = status
        kept = f"; the replaced one kept as {status.previous_data_directory}" if status.previous_data_directory else ""
        return (
            f"Job {name} verified {status.segments} WAL segments and the base backup against their signed "
            f"manifests and staged the data directory, set to recover to {status.target}{kept}"
        )

    def job_ended(self) -> None:
        pass

    # --- check -----------------------------------------------------------------------------------------

    def check(self) -> Outcome:
        """NewVolume: the claim holds it. InPlace (after ScaleUp): the server, with the policy's source login,
        out of recovery; its newest replayed commit recorded. A server the operator cannot reach is reported,
        not failed; one still in recovery past ``scaleTimeoutSeconds`` fails."""
        restore = self.restore
        status = restore.status.point_in_time or PointInTimeStatus()
        if not self.in_place:
            return f"PersistentVolumeClaim {status.volume_claim} holds the recovered data directory: mount it"
        source = shared.PostgresTarget(restore)  # the policy's source: its login, TLS and plaintext rules
        try:
            target = source.connection()
            with connect_target(target, source.credentials(target), source.ca(target)) as conn:
                row = conn.execute("SELECT pg_is_in_recovery(), pg_last_xact_replay_timestamp()").fetchone()
        except (RunbookError, psycopg.Error) as error:
            if restore.running_for() < restore.spec.scale_timeout_seconds:
                return Result.after(POLL_SECONDS)
            reason = error.message if isinstance(error, RunbookError) else type(error).__name__
            return f"the StatefulSet is back; the recovered server was not read ({reason})"
        assert row is not None
        if row[0]:
            if restore.running_for() < restore.spec.scale_timeout_seconds:
                return Result.after(POLL_SECONDS)
            raise RunbookError(
                "StillRecovering",
                f"{restore.status.target}: the server is still in recovery after {restore.spec.scale_timeout_seconds}s "
                "(not promoted: see its log for the recovery target)",
            )
        if row[1] is not None:
            status.recovered_time = wal_catalog.rfc3339(row[1])
        restore.status.point_in_time = status
        replayed = f"; its newest replayed commit {status.recovered_time}" if status.recovered_time else ""
        return f"the server is up and out of recovery (promoted){replayed}"

    def restored(self) -> str:
        status = self.restore.status.point_in_time or PointInTimeStatus()
        where = f"PersistentVolumeClaim {status.volume_claim}"
        if self.in_place:
            reached = f", newest replayed commit {status.recovered_time}" if status.recovered_time else ""
            kept = (
                f" (the replaced one kept as {status.previous_data_directory})"
                if status.previous_data_directory
                else ""
            )
            return f"recovered {where} to {status.target}{reached}{kept}; StatefulSet back at its recorded count"
        return f"{where} holds the data directory recovered to {status.target}; mount it to use it"
