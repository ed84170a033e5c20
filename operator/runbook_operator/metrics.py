"""Prometheus metrics. One registry for the process; names follow ``runbook_<area>_<what>_<unit>``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILE_ERRORS = Counter("runbook_reconcile_errors_total", "Reconciles that ended in an error.", ["kind"])
RECONCILE_PASSES = Counter(
    "runbook_reconcile_passes_total", "Reconcile passes run to their end (status written), by kind.", ["kind"]
)


_SERVING: set[int] = set()


def serve(port: int) -> None:
    """Expose /metrics on the port (0: do not); once per port (a standby serves it before kopf starts)."""
    if port and port not in _SERVING:
        start_http_server(port)
        _SERVING.add(port)


LEADER = Gauge(
    "runbook_leader",
    "1 while this replica acts (it holds the Lease, or runs without leader election), 0 as a hot standby.",
)


__all__ = ["LEADER", "RECONCILE_ERRORS", "RECONCILE_PASSES", "Counter", "Gauge", "Histogram", "serve"]

# EmergencyIsolation
ISOLATIONS_ACTIVE = Gauge(
    "runbook_isolations_active", "Whether an EmergencyIsolation holds the namespace (1) or not (0).", ["namespace"]
)
ISOLATION_TIME_TO_CONTAIN = Histogram(
    "runbook_isolation_time_to_contain_seconds",
    "From an EmergencyIsolation's creation to its deny-all NetworkPolicy being created. creationTimestamp has "
    "whole seconds, so the clock starts when the operator received the object if that was within its creation "
    "second (leaving out only the watch delivery and kopf's finalizer write), else at creationTimestamp.",
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)

# SecretRotation
SECRET_LAST_ROTATION = Gauge(
    "runbook_secret_last_rotation_timestamp_seconds",
    "When the SecretRotation last finished a rotation (Unix time).",
    ["namespace", "name"],
)

# BackupPolicy
_BACKUP_LABELS = ["namespace", "policy", "source"]
BACKUP_LAST_SUCCESS = Gauge(
    "runbook_backup_last_success_timestamp_seconds",
    "When the newest complete backup (its manifest verified) finished (Unix time).",
    _BACKUP_LABELS,
)
BACKUP_DURATION = Gauge(
    "runbook_backup_duration_seconds", "How long the newest complete backup took, per its manifest.", _BACKUP_LABELS
)
BACKUP_SIZE = Gauge("runbook_backup_size_bytes", "Size of the newest complete (encrypted) backup.", _BACKUP_LABELS)
BACKUP_FAILURES = Counter(
    "runbook_backup_failures_total", "Backup runs that failed or left no valid manifest.", _BACKUP_LABELS
)

# BackupPolicy spec.wal (reconcilers/wal.py), set on each of the policy's passes (every WAL_RECHECK seconds)
_WAL_LABELS = ["namespace", "policy"]
WAL_ARCHIVE_LAG = Gauge(
    "runbook_wal_archive_lag_seconds",
    "Seconds since the newest WAL in the bucket was shipped (about the RPO while the server is writing).",
    _WAL_LABELS,
)
WAL_RECOVERY_WINDOW = Gauge(
    "runbook_wal_recovery_window_seconds",
    "How far back a point-in-time restore can go: latest - earliest recoverable point (0 without a window).",
    _WAL_LABELS,
)
WAL_SLOT_RETAINED = Gauge(
    "runbook_wal_slot_retained_bytes",
    "WAL the server keeps for the policy's replication slot (current LSN - the slot's restart LSN).",
    _WAL_LABELS,
)

# BackupRestore
RESTORES = Counter("runbook_restores_total", "BackupRestores that ended, by outcome.", ["namespace", "outcome"])
BACKUP_LAST_VERIFIED = Gauge(
    "runbook_backup_last_verified_timestamp_seconds",
    "When a restore drill last restored the policy's newest backup and found it matching its manifest (Unix time).",
    ["namespace", "policy"],
)

# For the alert rules (deploy/monitoring/): the facts they compare with time(), per object, bounded labels.
BACKUP_LAST_FAILURE = Gauge(
    "runbook_backup_last_failure_timestamp_seconds",
    "When the newest failed backup run (or one without a valid manifest) finished (Unix time).",
    _BACKUP_LABELS,
)
BACKUP_SCHEDULE_INTERVAL = Gauge(
    "runbook_backup_schedule_interval_seconds",
    "The longest gap between two runs of the policy's schedule (absent while suspended): a backup older than "
    "this plus a grace is overdue.",
    _BACKUP_LABELS,
)
BACKUP_LAST_DRILL_PASSED = Gauge(
    "runbook_backup_last_drill_passed",
    "Whether the policy's newest restore drill passed (1) or failed (0).",
    ["namespace", "policy"],
)
RESTORE_DURATION = Histogram(
    "runbook_restore_duration_seconds",
    "From a BackupRestore's start to its end, by outcome.",
    ["namespace", "outcome"],
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
)
SECRET_NEXT_ROTATION = Gauge(
    "runbook_secret_next_rotation_timestamp_seconds",
    "When the SecretRotation's next scheduled rotation is due (Unix time); a past value means overdue.",
    ["namespace", "name"],
)
ISOLATION_INFO = Gauge(
    "runbook_isolation_info",
    "1 while the EmergencyIsolation holds its namespace (the series is removed on release).",
    ["namespace", "name", "incident", "severity"],
)
KINDS = ("BackupPolicy", "BackupRestore", "SecretRotation", "EmergencyIsolation", "ScalingProfile")
for _kind in KINDS:  # every series exists from the start at 0, so increase() sees the first error
    RECONCILE_ERRORS.labels(_kind)


def _forget(metrics: tuple[Gauge | Counter, ...], **match: str) -> None:
    """Remove every series of these metrics whose labels include ``match``."""
    for metric in metrics:
        names = metric._labelnames
        for family in metric.collect():
            for sample in family.samples:
                if all(sample.labels.get(k) == v for k, v in match.items()) and set(names) <= set(sample.labels):
                    metric.remove(*(sample.labels[n] for n in names))


def forget_backup_policy(namespace: str, policy: str) -> None:
    """A deleted BackupPolicy's series go with it (else it would stay overdue until the operator restarts)."""
    _forget(
        (
            BACKUP_LAST_SUCCESS,
            BACKUP_DURATION,
            BACKUP_SIZE,
            BACKUP_FAILURES,
            BACKUP_LAST_FAILURE,
            BACKUP_SCHEDULE_INTERVAL,
            BACKUP_LAST_VERIFIED,
            BACKUP_LAST_DRILL_PASSED,
            WAL_ARCHIVE_LAG,
            WAL_RECOVERY_WINDOW,
            WAL_SLOT_RETAINED,
        ),
        namespace=namespace,
        policy=policy,
    )


def forget_wal_policy(namespace: str, policy: str) -> None:
    """A policy that stopped archiving WAL (spec.wal.enabled false) has no WAL gauges."""
    _forget((WAL_ARCHIVE_LAG, WAL_RECOVERY_WINDOW, WAL_SLOT_RETAINED), namespace=namespace, policy=policy)


def forget_secret_rotation(namespace: str, name: str) -> None:
    """A deleted SecretRotation's series go with it (else it would be overdue until the operator restarts)."""
    _forget((SECRET_LAST_ROTATION, SECRET_NEXT_ROTATION), namespace=namespace, name=name)
