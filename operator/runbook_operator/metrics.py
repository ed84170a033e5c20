"""Prometheus metrics. One registry for the process; names follow ``runbook_<area>_<what>_<unit>``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILE_ERRORS = Counter("runbook_reconcile_errors_total", "Reconciles that ended in an error.", ["kind"])


def serve(port: int) -> None:
    """Expose /metrics on the port (0: do not)."""
    if port:
        start_http_server(port)


__all__ = ["RECONCILE_ERRORS", "Counter", "Gauge", "Histogram", "serve"]

# EmergencyIsolation
ISOLATIONS_ACTIVE = Gauge(
    "runbook_isolations_active", "Whether an EmergencyIsolation holds the namespace (1) or not (0).", ["namespace"]
)
ISOLATION_TIME_TO_CONTAIN = Histogram(
    "runbook_isolation_time_to_contain_seconds",
    "From an EmergencyIsolation's creation to its deny-all NetworkPolicy being created.",
    buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60),
)

# SecretRotation
SECRET_LAST_ROTATION = Gauge(
    "runbook_secret_last_rotation_timestamp_seconds",
    "When the SecretRotation last finished a rotation (Unix time).",
    ["namespace", "name"],
)
