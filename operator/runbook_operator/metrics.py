"""Prometheus metrics. One registry for the process; names follow ``runbook_<area>_<what>_<unit>``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILE_ERRORS = Counter("runbook_reconcile_errors_total", "Reconciles that ended in an error.", ["kind"])


def serve(port: int) -> None:
    """Expose /metrics on the port (0: do not)."""
    if port:
        start_http_server(port)


__all__ = ["RECONCILE_ERRORS", "Counter", "Gauge", "Histogram", "serve"]
