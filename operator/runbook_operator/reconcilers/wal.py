"""BackupPolicy spec.wal: continuous WAL archiving, the operator's side (the agents are ``agent/wal.py``, the
bucket's archive ``wal_catalog.py``).

``reconcile`` runs inside each BackupPolicy pass (``backup.reconcile`` calls it after the dump CronJob) with
the pass's confined spec, so the replication login goes to the same host the tenancy rules allowed for the
source, with the source's TLS. Each pass:

1. connects as the replication login (spec.wal.replicationCredentialsSecretRef) and checks what streaming
   needs: the REPLICATION attribute, ``wal_level`` above minimal with WAL senders, and the slot: absent (then
   created, ``pg_create_physical_replication_slot(name, true)``, and recorded in status.wal.slotName at once)
   or the one status records as ours; any other slot of that name is ``SlotTaken``. A failure is the pass's
   (Ready=False naming the field, and WALArchiving=False with the same reason);
2. applies the owned receiver Deployment and base-backup CronJob (``builders/wal.py``); the first base backup
   starts at once when the bucket has none (the chain needs one);
3. reads the archive (``wal_catalog.read_catalog``) and the slot (``pg_replication_slots``) into status.wal,
   the conditions WALArchiving and RecoveryWindow and the ``runbook_wal_*`` gauges; Events when a gap
   appears and when the receiver leaves or comes back; prunes what retention no longer needs;
4. asks for the next pass in ``WAL_RECHECK`` seconds (the window and the lag move with time).

A slot without a receiver for longer than spec.wal.receiverGoneSeconds is WALArchiving=False
(``SlotInactive``): the server keeps WAL for it and its disk fills. ``enabled: false`` stops the receiver
and drops the slot (the archive stays); deleting the policy drops the slot (``finalize``, from main.py's
BackupPolicy finalizer).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import botocore.exceptions
import psycopg

from .. import metrics
from ..builders.backup import POLICY_LABEL, build_backup_now_job
from ..builders.common import contains
from ..builders.wal import (
    BASE_BACKUP_COMPONENT,
    RECEIVER_GRACE_SECONDS,
    base_backup_cronjob_name,
    build_base_backup_cronjob,
    build_receiver,
    receiver_name,
)
from ..clients import kube, postgres, s3
from ..conditions import RECOVERY_WINDOW, WAL_ARCHIVING
from ..errors import RunbookError
from ..logs import REDACTOR
from ..models.backup import BackupPolicySpec, BackupPolicyStatus, WALArchiving, WALStatus
from ..models.common import parse_duration, parse_time, rfc3339
from ..models.plans import (
    BASE_FOLDER,
    MANIFEST_KEY_SECRET,
    MANIFEST_KEY_SECRET_KEY,
    format_lsn,
    policy_folder,
    slot_name,
)
from ..models.sources import PostgresConnection
from ..settings import agent_image
from . import tenancy, wal_catalog
from .catalog import S3_CREDENTIALS_FIELD, s3_client
from .runtime import Context, Reconciler, Result

LOG = logging.getLogger(__name__)
CREDENTIALS_FIELD = "spec.wal.replicationCredentialsSecretRef"
SLOT_FIELD = "spec.wal.slotName"
WAL_FIELD = "spec.wal"
SOURCE_FIELD = "spec.source.postgresql"
WAL_RECHECK = 30.0  # seconds between a WAL policy's passes: status.wal, the conditions and the gauges
RETRY = 30.0
DROP_RETRY = 5.0  # seconds until a slot whose receiver is stopping is dropped
FIRST_BASE_BACKUP = "first-base-backup"

PolicyContext = Context[BackupPolicySpec, BackupPolicyStatus]


# --- the slot's absence of a receiver, across passes --------------------------------------------------------
# PostgreSQL before 17 does not say since when a slot is inactive: the operator remembers when a pass first saw
# it so (memory only: after a restart the clock starts again, so SlotInactive comes later, never sooner).
_INACTIVE_SINCE: dict[tuple[str, str, str], datetime] = {}
_INACTIVE_LOCK = threading.Lock()


def inactive_since(key: tuple[str, str, str], slot: postgres.Slot, now: datetime) -> datetime | None:
    """Since when the slot has had no receiver (the server's own ``inactive_since`` where it has one), or None
    while one is connected."""
    with _INACTIVE_LOCK:
        if slot.active:
            _INACTIVE_SINCE.pop(key, None)
            return None
        server = parse_time(slot.inactive_since) if slot.inactive_since else None
        seen = _INACTIVE_SINCE.setdefault(key, now)
        return server or seen


def forget_inactive(namespace: str, policy: str) -> None:
    with _INACTIVE_LOCK:
        for key in [k for k in _INACTIVE_SINCE if k[:2] == (namespace, policy)]:
            del _INACTIVE_SINCE[key]


# --- pure decisions (tests/unit/test_wal_reconcile.py) -------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """A condition's status, reason and message."""

    status: str
    reason: str
    message: str


def archiving_verdict(
    wal: WALArchiving,
    slot: postgres.Slot,
    *,
    since: datetime | None,
    now: datetime,
    receiver: str,
    last_archived: datetime | None,
) -> Verdict:
    """WALArchiving from the slot: True while a receiver streams through it; False (SlotInactive) when none has
    for longer than receiverGoneSeconds, or (SlotLost) when the server removed WAL the slot needed; Unknown
    (ReceiverNotConnected) for a shorter absence (a start, a restart)."""
    retained = f"{slot.retained_bytes} bytes" if slot.retained_bytes is not None else "its WAL"
    if slot.wal_status == "lost":
        return Verdict(
            "False",
            "SlotLost",
            f"the server removed WAL the replication slot {slot.name} still needed (max_slot_wal_keep_size): the "
            "archive has a gap until the next base backup",
        )
    if since is None:
        shipped = f"; newest WAL shipped {rfc3339(last_archived)}" if last_archived is not None else ""
        return Verdict("True", "Streaming", f"Deployment {receiver} streams through slot {slot.name}{shipped}")
    away = int((now - since).total_seconds())
    if away > wal.receiver_gone_seconds:
        return Verdict(
            "False",
            "SlotInactive",
            f"the replication slot {slot.name} has had no receiver for {away} s (spec.wal.receiverGoneSeconds: "
            f"{wal.receiver_gone_seconds}): the server keeps {retained} for it and its disk fills; see Deployment "
            f"{receiver}",
        )
    return Verdict(
        "Unknown", "ReceiverNotConnected", f"no receiver on slot {slot.name} for {away} s (Deployment {receiver})"
    )


def window_verdict(catalog: wal_catalog.WALCatalog) -> Verdict:
    """RecoveryWindow from the archive: True with the window, False without one (no base backup yet, or a gap
    after every base backup), naming the missing WAL."""
    path = catalog.timeline
    history = catalog.missing_history(path) if path is not None else None
    if history is not None:
        return Verdict("False", "WALGap", f"no point is recoverable on timeline {path}: {history}")
    window = catalog.window()
    gaps = catalog.gaps()
    missing = "; missing " + ", ".join(g.describe() for g in gaps) if gaps else ""
    if window is not None:
        return Verdict(
            "True",
            "Available",
            f"recoverable from {rfc3339(window.earliest_time)} to {rfc3339(window.latest_time)} "
            f"({window.seconds} s, base backup {window.base_backup.rstrip('/').rsplit('/', 1)[-1]}){missing}",
        )
    if gaps:
        return Verdict("False", "WALGap", f"no base backup reaches the newest WAL{missing}")
    if not catalog.base_backups:
        return Verdict("False", "NoBaseBackup", "no base backup in the bucket yet: the chain starts with one")
    if catalog.latest() is None:
        return Verdict("False", "NoWAL", "no WAL in the bucket yet")
    return Verdict("False", "WALBehind", "the WAL in the bucket does not reach a base backup's stop point yet")


# --- the replication login ------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return REDACTOR.scrub(lines[0])[:300] if lines else type(error).__name__


@contextmanager
def replication_connection(
    api: kube.Api, namespace: str, source: PostgresConnection, wal: WALArchiving
) -> Iterator[psycopg.Connection[Any]]:
    """An SQL connection to the source's (confined) host and database as the replication login, with the
    source's TLS (verify-full against its CA) and SCRAM only; failures as RunbookErrors naming the field."""
    ref = wal.replication_credentials_secret_ref
    user = kube.secret_value(api, namespace, ref.name, ref.username_key, field=CREDENTIALS_FIELD, redact=False)
    password = kube.secret_value(api, namespace, ref.name, ref.password_key, field=CREDENTIALS_FIELD)
    ca = None
    if source.tls is not None:
        ca_ref = source.tls.ca_secret_ref
        ca = kube.secret_value(api, namespace, ca_ref.name, ca_ref.key, field=f"{SOURCE_FIELD}.tls.caSecretRef")
    server = f"{source.host}:{source.port}"
    try:
        conn = postgres.connect(
            host=source.host,
            port=source.port,
            database=source.database,
            user=user,
            password=password,
            ca=ca,
            limits=postgres.OPERATOR_LIMITS,
        )
    except psycopg.OperationalError as error:
        problem = postgres.tls_problem(error)
        if problem is not None:
            raise RunbookError("TLSFailed", f"{SOURCE_FIELD}.{problem} ({server})", retry_after=RETRY) from None
        text = str(error)
        if "password authentication failed" in text:
            raise RunbookError(
                "CredentialsRejected", f"{CREDENTIALS_FIELD}: {server} rejected the login {user}", retry_after=RETRY
            ) from None
        if "no pg_hba.conf entry" in text:
            raise RunbookError(
                "LoginNotAllowed",
                f"{CREDENTIALS_FIELD}: the pg_hba.conf of {server} has no line for the login {user} to database "
                f"{source.database} (the operator checks the slot over SQL; pg_receivewal needs a replication line)",
                retry_after=RETRY,
            ) from None
        if postgres.refused(error):
            raise RunbookError(
                "LoginRefused",
                f"{CREDENTIALS_FIELD}: {server} refused the login {user}: {_one_line(error)}",
                retry_after=RETRY,
            ) from None
        raise RunbookError(
            "SourceUnavailable", f"{SOURCE_FIELD}: cannot reach {server}: {_one_line(error)}", retry_after=RETRY
        ) from None
    try:
        with conn:
            yield conn
    except psycopg.Error as error:
        raise RunbookError("SourceFailed", f"{SOURCE_FIELD}: {server}: {_one_line(error)}", retry_after=RETRY) from None


def check_server(facts: postgres.ReplicationFacts, source: PostgresConnection) -> None:
    """What streaming needs of the login and the server, each a RunbookError naming the field to change."""
    server = f"{source.host}:{source.port}"
    if not facts.can_replicate:
        raise RunbookError(
            "ReplicationNotPermitted",
            f"{CREDENTIALS_FIELD}: the login {facts.user} lacks the REPLICATION attribute on {server} "
            f"(ALTER ROLE {facts.user} REPLICATION)",
            retry_after=300,
        )
    if facts.wal_level == "minimal" or facts.max_wal_senders == 0:
        raise RunbookError(
            "WALLevelMinimal",
            f"{WAL_FIELD}: the server {server} streams no WAL (wal_level={facts.wal_level}, max_wal_senders="
            f"{facts.max_wal_senders}): continuous archiving needs wal_level=replica and max_wal_senders > 0 "
            "(a server restart)",
            retry_after=300,
        )
    if facts.in_recovery:
        raise RunbookError(
            "SourceIsStandby",
            f"{SOURCE_FIELD}: {server} is a standby (in recovery): archive from the primary",
            retry_after=300,
        )


def ensure_slot(ctx: PolicyContext, conn: psycopg.Connection[Any], name: str) -> postgres.Slot:
    """The policy's slot: created when absent (and recorded in status at once, so a crash cannot leave one
    nobody claims); refused when a slot of that name is not the one status records as ours."""
    wal_status = ctx.status.wal
    assert wal_status is not None
    ours = wal_status.slot_name
    if ours is not None and ours != name:  # spec.wal.slotName changed: the old slot goes first
        old = postgres.replication_slot(conn, ours)
        if old is not None and old.active:
            postgres.terminate_slot_receiver(conn, old)
        if not postgres.drop_slot(conn, ours):
            raise RunbookError(
                "SlotBusy", f"{SLOT_FIELD}: the previous slot {ours} still has a receiver", retry_after=5
            )
        ctx.event("Normal", "SlotDropped", f"replication slot {ours} dropped (spec.wal.slotName is now {name})")
        wal_status.slot_name = ours = None
        ctx.checkpoint()
    slot = postgres.replication_slot(conn, name)
    if slot is not None and ours != name:
        raise RunbookError(
            "SlotTaken",
            f"{SLOT_FIELD}: a replication slot {name} ({slot.slot_type}) exists on the server and was not created "
            "for this policy: name another slot, or drop that one if nothing uses it",
            retry_after=300,
        )
    if slot is not None and slot.slot_type != "physical":
        raise RunbookError("SlotTaken", f"{SLOT_FIELD}: {name} is a {slot.slot_type} slot", retry_after=300)
    if slot is None:
        if not postgres.create_physical_slot(conn, name):
            raise RunbookError(
                "SlotTaken", f"{SLOT_FIELD}: a replication slot {name} was created meanwhile", retry_after=300
            )
        if ours == name:
            ctx.event(
                "Warning",
                "SlotRecreated",
                f"replication slot {name} was gone (dropped by hand?) and is created again: WAL written meanwhile "
                "is not in the archive until the next base backup",
            )
        else:
            ctx.event("Normal", "SlotCreated", f"replication slot {name} created; WAL is kept for it from now")
        wal_status.slot_name = name
        ctx.checkpoint()
        slot = postgres.replication_slot(conn, name)
        assert slot is not None
    return slot


# --- children ---------------------------------------------------------------------------------------------------


def _apply(api: kube.Api, resource: kube.Resource, desired: dict[str, Any]) -> str | None:
    """Server-side apply unless the live object has every desired value: None, "created" or "changed"."""
    metadata = desired["metadata"]
    current = api.get(resource, metadata["namespace"], metadata["name"])
    if current is not None and contains(current, desired):
        return None
    api.apply(resource, metadata["namespace"], desired)
    return "created" if current is None else "changed"


def _children(ctx: PolicyContext, spec: BackupPolicySpec) -> None:
    uid = str(ctx.body["metadata"]["uid"])
    image = agent_image()
    for resource, desired in (
        (kube.DEPLOYMENTS, build_receiver(spec, namespace=ctx.namespace, policy=ctx.name, uid=uid, image=image)),
        (
            kube.CRON_JOBS,
            build_base_backup_cronjob(spec, namespace=ctx.namespace, policy=ctx.name, uid=uid, image=image),
        ),
    ):
        if _apply(ctx.api, resource, desired) == "changed":
            ctx.event("Normal", f"{resource.kind}Applied", f"{resource.kind} {desired['metadata']['name']} updated")


def first_base_backup(ctx: PolicyContext, catalog: wal_catalog.WALCatalog) -> None:
    """With no base backup in the bucket and none of the CronJob's Jobs yet, one starts now (the chain needs
    one; the schedule's first run may be hours away). Once per policy: its name comes from the policy's uid."""
    if catalog.base_backups:
        return
    labels = f"{POLICY_LABEL}={ctx.name},app.kubernetes.io/component={BASE_BACKUP_COMPONENT}"
    if ctx.api.list(kube.JOBS, ctx.namespace, labels=labels):
        return
    cronjob = ctx.api.get(kube.CRON_JOBS, ctx.namespace, base_backup_cronjob_name(ctx.name))
    if cronjob is None:
        return
    job = build_backup_now_job(cronjob, f"{FIRST_BASE_BACKUP}-{ctx.body['metadata']['uid']}")
    if ctx.api.create(kube.JOBS, ctx.namespace, job):
        ctx.event("Normal", "BaseBackupStarted", f"Job {job['metadata']['name']}: the first base backup")


# --- the pass ---------------------------------------------------------------------------------------------------


def reconcile(ctx: PolicyContext, spec: BackupPolicySpec, later: Result) -> Result:
    """spec.wal's part of a BackupPolicy pass (``spec`` is the pass's confined spec); returns ``later`` with
    the next pass no later than ``WAL_RECHECK``. Raises the RunbookError of a precondition."""
    wal, source = spec.wal, spec.source.postgresql
    status = ctx.status.wal = ctx.status.wal or WALStatus()
    if wal is None or source is None:
        if status.slot_name is None:
            ctx.status.wal = None  # never archived, or its slot already dropped: nothing to show
            return later
        # The login is no longer known, so the slot cannot be dropped: the receiver (its own copy of the spec)
        # keeps streaming, so the server's disk does not fill, and the condition says what to do.
        ctx.condition(
            WAL_ARCHIVING,
            "False",
            "SlotLeft",
            f"spec.wal was removed while replication slot {status.slot_name} exists: Deployment "
            f"{receiver_name(ctx.name)} keeps streaming through it. Set spec.wal back with enabled: false (the "
            "operator stops the receiver and drops the slot)",
        )
        return later
    name = wal.slot_name or slot_name(ctx.namespace, ctx.name)
    try:
        with replication_connection(ctx.api, ctx.namespace, source, wal) as conn:
            check_server(postgres.replication_facts(conn), source)
            if not wal.enabled:
                _children(ctx, spec)  # the receiver at 0 replicas, base backups suspended
                _drop(ctx, conn, status)
                ctx.condition(WAL_ARCHIVING, "False", "Disabled", "spec.wal.enabled is false: no WAL is archived")
                metrics.forget_wal_policy(ctx.namespace, ctx.name)
                return _sooner(later, DROP_RETRY if status.slot_name else None)  # its receiver is stopping
            slot = ensure_slot(ctx, conn, name)
            _children(ctx, spec)
            status.receiver = receiver_name(ctx.name)
            status.base_backup_cron_job = base_backup_cronjob_name(ctx.name)
            slot = postgres.replication_slot(conn, name) or slot
    except RunbookError as error:
        ctx.condition(WAL_ARCHIVING, "False", error.reason, error.message)
        raise
    observe(ctx, spec, wal, slot)
    return _sooner(later, WAL_RECHECK)


def _sooner(later: Result, seconds: float | None) -> Result:
    if seconds is None or later.error is not None:
        return later
    if later.requeue_after is None or later.requeue_after > seconds:
        return Result.after(seconds)
    return later


# A slot about to be dropped whose receiver is still on it: the receiver is given its Deployment's grace period
# to stop by itself (it ships what it received on SIGTERM); only then is its WAL sender ended on the server.
STOP_GRACE_SECONDS = RECEIVER_GRACE_SECONDS + 15
_STOPPING: dict[tuple[str, str], datetime] = {}


def released(conn: psycopg.Connection[Any], key: tuple[str, str], slot: postgres.Slot, now: datetime) -> bool:
    """Whether no receiver holds ``slot`` (of the policy ``key``) any more; one that stays past the grace
    period has its WAL sender ended (the next look finds the slot free)."""
    if not slot.active:
        _STOPPING.pop(key, None)
        return True
    first = _STOPPING.setdefault(key, now)
    if (now - first).total_seconds() > STOP_GRACE_SECONDS:
        postgres.terminate_slot_receiver(conn, slot)
    return False


def _drop(ctx: PolicyContext, conn: psycopg.Connection[Any], status: WALStatus) -> None:
    """Drop the slot status records (its receiver is stopping: ended on the server, tried again next pass)."""
    if status.slot_name is None:
        return
    slot = postgres.replication_slot(conn, status.slot_name)
    if slot is not None and not released(conn, (ctx.namespace, ctx.name), slot, ctx.now()):
        return
    if postgres.drop_slot(conn, status.slot_name):
        ctx.event("Normal", "SlotDropped", f"replication slot {status.slot_name} dropped")
        status.slot_name = None
        status.slot_active = None
        status.slot_retained_bytes = None


def observe(ctx: PolicyContext, spec: BackupPolicySpec, wal: WALArchiving, slot: postgres.Slot) -> None:
    """status.wal, the conditions, the gauges and the Events from the slot and the archive; then retention."""
    status = ctx.status.wal
    assert status is not None
    now = ctx.now()
    receiver = receiver_name(ctx.name)
    was_active = status.slot_active
    status.slot_active = slot.active
    status.slot_retained_bytes = slot.retained_bytes
    if was_active is True and not slot.active:
        ctx.event("Warning", "ReceiverDisconnected", f"no receiver on replication slot {slot.name} ({receiver})")
    elif was_active is False and slot.active:
        ctx.event("Normal", "ReceiverConnected", f"a receiver streams through replication slot {slot.name} again")
    labels = (ctx.namespace, ctx.name)
    metrics.WAL_SLOT_RETAINED.labels(*labels).set(float(slot.retained_bytes or 0))

    location = spec.destination.s3
    client = s3_client(ctx.api, ctx.namespace, location, field=S3_CREDENTIALS_FIELD)
    key = kube.secret_value(
        ctx.api,
        ctx.namespace,
        MANIFEST_KEY_SECRET,
        MANIFEST_KEY_SECRET_KEY,
        field=f"Secret {MANIFEST_KEY_SECRET} (the namespace's manifest signing key)",
    )
    catalog = wal_catalog.read_catalog(client, location, namespace=ctx.namespace, policy=ctx.name, signing_key=key)
    newest = catalog.latest()
    status.timeline = catalog.timeline
    status.segments = len(catalog.segments)
    status.base_backups = len(catalog.base_backups)
    status.last_base_backup = catalog.base_backups[-1].folder if catalog.base_backups else None
    status.last_archived_lsn = format_lsn(newest[0]) if newest is not None else None
    status.last_archived_time = rfc3339(newest[1]) if newest is not None else None
    window = catalog.window()
    status.earliest_recoverable_time = rfc3339(window.earliest_time) if window is not None else None
    status.latest_recoverable_time = rfc3339(window.latest_time) if window is not None else None
    status.window_seconds = window.seconds if window is not None else None
    metrics.WAL_RECOVERY_WINDOW.labels(*labels).set(float(window.seconds if window is not None else 0))
    if newest is not None:
        metrics.WAL_ARCHIVE_LAG.labels(*labels).set(max(0.0, (now - newest[1]).total_seconds()))

    since = inactive_since((ctx.namespace, ctx.name, slot.name), slot, now)
    archiving = archiving_verdict(
        wal, slot, since=since, now=now, receiver=receiver, last_archived=newest[1] if newest else None
    )
    before = _condition(ctx, WAL_ARCHIVING)
    ctx.condition(WAL_ARCHIVING, archiving.status, archiving.reason, archiving.message)  # type: ignore[arg-type]
    if archiving.status == "False" and (before is None or before.reason != archiving.reason):
        ctx.event("Warning", archiving.reason, archiving.message)

    recovery = window_verdict(catalog)
    before = _condition(ctx, RECOVERY_WINDOW)
    ctx.condition(RECOVERY_WINDOW, recovery.status, recovery.reason, recovery.message)  # type: ignore[arg-type]
    for gap in catalog.gaps():
        described = gap.describe()
        if before is None or described not in (before.message or ""):
            ctx.event("Warning", "WALGap", f"the archive is missing {described}")

    first_base_backup(ctx, catalog)
    pruned = wal_catalog.prune(client, location, catalog, now=now, retention=parse_duration(wal.retention))
    if pruned:
        ctx.event(
            "Normal",
            "WALPruned",
            f"deleted {len(pruned)} object(s) no point of the last {wal.retention} needs (spec.wal.retention)",
        )


def _condition(ctx: PolicyContext, type_: str) -> Any:
    return next((c for c in ctx.status.conditions if c.type == type_), None)


# --- deletion -------------------------------------------------------------------------------------------------


def needs_finalizer(spec: Mapping[str, Any]) -> bool:
    """Deletion has work to do: the policy archives WAL, so its slot must go (or the server keeps WAL forever)."""
    return bool(spec.get("wal"))


def finalize(ctx: PolicyContext) -> Result:
    """Stop the receiver and drop the slot status records as ours (main.py gives up after a few attempts, so an
    unreachable server does not hold the policy forever; the Warning Event then names the slot to drop)."""
    status = ctx.status.wal
    forget_inactive(ctx.namespace, ctx.name)
    if (ctx.body.get("spec") or {}).get("deletionPolicy") == "Delete":
        delete_archive(ctx)
    if status is None or status.slot_name is None:
        return Result.done()
    slot = status.slot_name
    try:
        spec = ctx.confine(tenancy.confine_backup_policy(ctx.api, ctx.grants(ctx.namespace), ctx.namespace, ctx.spec))
        wal, source = spec.wal, spec.source.postgresql
        if wal is None or source is None:
            raise RunbookError("SlotLeft", f"{WAL_FIELD}: absent, so the slot's login is unknown")
        ctx.api.patch(
            kube.DEPLOYMENTS, ctx.namespace, receiver_name(ctx.name), {"spec": {"replicas": 0}}, subresource="scale"
        )
        with replication_connection(ctx.api, ctx.namespace, source, wal) as conn:
            found = postgres.replication_slot(conn, slot)
            if found is not None and not released(conn, (ctx.namespace, ctx.name), found, ctx.now()):
                raise RunbookError("SlotBusy", f"{SLOT_FIELD}: {slot} still has a receiver; stopping it", retry_after=5)
            postgres.drop_slot(conn, slot)
    except RunbookError as error:
        raise RunbookError(
            "SlotNotDropped",
            f"dropping replication slot {slot}: {error.message} (if the policy goes anyway, drop it on the server: "
            f"SELECT pg_drop_replication_slot('{slot}'))",
            retry_after=error.retry_after or 10,
        ) from None
    status.slot_name = None
    ctx.event("Normal", "SlotDropped", f"replication slot {slot} dropped (the policy is being deleted)")
    return Result.done()


def delete_archive(ctx: PolicyContext) -> None:
    """deletionPolicy Delete: the policy's WAL and base backups go too (manifests first), as its dumps do
    (``backup.finalize``)."""
    try:
        location = tenancy.confine_backup_policy(ctx.api, ctx.grants(ctx.namespace), ctx.namespace, ctx.spec)
        client = s3_client(ctx.api, ctx.namespace, location.destination.s3, field=S3_CREDENTIALS_FIELD)
        where = location.destination.s3
        base = policy_folder(where, ctx.namespace, ctx.name)
        keys = [
            *s3.list_keys(client, where, wal_catalog.wal_folder(base)),
            *s3.list_keys(client, where, f"{base}{BASE_FOLDER}/"),
        ]
        s3.delete_keys(client, where, [k for k in keys if k.endswith(".json")])
        s3.delete_keys(client, where, [k for k in keys if not k.endswith(".json")])
    except (RunbookError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        message = error.message if isinstance(error, RunbookError) else type(error).__name__
        raise RunbookError("WALNotDeleted", f"deleting the WAL archive: {message}", retry_after=30) from None
    if keys:
        ctx.event("Normal", "WALDeleted", f"deleted the WAL archive: {len(keys)} object(s) (deletionPolicy Delete)")


def _no_pass(ctx: PolicyContext) -> Result:
    """WAL has no pass of its own: ``reconcile`` runs inside the BackupPolicy's (reconcilers/backup.py)."""
    del ctx
    return Result.done()


# The BackupPolicy kind as far as WAL deletion goes (main.py's finalizer drives ``finalize`` through it).
POLICY = Reconciler(
    kube.custom_resource("backuppolicies", "BackupPolicy"), BackupPolicySpec, BackupPolicyStatus, _no_pass, finalize
)
