"""Series of deleted objects go with them (an overdue alert must not outlive its BackupPolicy)."""

from __future__ import annotations

from prometheus_client import REGISTRY

from runbook_operator import metrics


def series(metric: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(metric, labels)


def test_a_deleted_policy_and_rotation_take_their_series_and_leave_others() -> None:
    for policy in ("gone", "kept"):
        labels = {"namespace": "ns-m", "policy": policy, "source": "postgresql"}
        metrics.BACKUP_SCHEDULE_INTERVAL.labels(**labels).set(21600)
        metrics.BACKUP_LAST_SUCCESS.labels(**labels).set(1.0)
        metrics.BACKUP_FAILURES.labels(**labels).inc()
        metrics.BACKUP_LAST_VERIFIED.labels("ns-m", policy).set(2.0)
    metrics.SECRET_NEXT_ROTATION.labels("ns-m", "gone").set(3.0)
    metrics.SECRET_NEXT_ROTATION.labels("ns-m", "kept").set(3.0)

    metrics.forget_backup_policy("ns-m", "gone")
    metrics.forget_secret_rotation("ns-m", "gone")

    gone = {"namespace": "ns-m", "policy": "gone", "source": "postgresql"}
    kept = {**gone, "policy": "kept"}
    assert series("runbook_backup_schedule_interval_seconds", **gone) is None
    assert series("runbook_backup_last_success_timestamp_seconds", **gone) is None
    assert series("runbook_backup_failures_total", **gone) is None
    assert series("runbook_backup_last_verified_timestamp_seconds", namespace="ns-m", policy="gone") is None
    assert series("runbook_secret_next_rotation_timestamp_seconds", namespace="ns-m", name="gone") is None
    assert series("runbook_backup_schedule_interval_seconds", **kept) == 21600
    assert series("runbook_backup_failures_total", **kept) == 1
    assert series("runbook_secret_next_rotation_timestamp_seconds", namespace="ns-m", name="kept") == 3.0
