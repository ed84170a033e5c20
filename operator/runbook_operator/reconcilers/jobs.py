"""Reading the Jobs the operator starts (backups, restores, drills): outcome, the agent's reason and summary.

An agent ends with one line in its termination message: ``<prefix><Reason>: <detail>`` on failure, a JSON
object on success; the operator reads it here and nowhere else.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from ..clients import kube
from ..logs import REDACTOR
from ..models.common import parse_time

FAILURE_PREFIX = "backup failed: "


def job_outcome(job: Mapping[str, Any]) -> tuple[str, datetime] | None:
    """("Complete" | "Failed", when) for a finished Job, None while it runs."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            when = parse_time(condition.get("lastTransitionTime")) or parse_time(job["metadata"]["creationTimestamp"])
            assert when is not None
            return condition["type"], when
    return None


def termination_messages(pods: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """Each container's termination message (where an agent writes its last line)."""
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            yield ((container.get("state") or {}).get("terminated") or {}).get("message") or ""


def failure_reason(
    job: Mapping[str, Any], pods: Iterable[Mapping[str, Any]], *, prefix: str = FAILURE_PREFIX
) -> tuple[str, str]:
    """The agent's one-line reason (after ``prefix``) from its pods' termination messages, else the Job's
    own condition. Restores read their agent's ``restore failed: `` lines the same way."""
    for message in termination_messages(pods):
        lines = [line for line in message.splitlines() if line.startswith(prefix)]
        if lines:
            reason, _, detail = lines[-1][len(prefix) :].partition(": ")
            return reason or "BackupFailed", REDACTOR.scrub(detail)[:512]
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Failed":
            return condition.get("reason") or "JobFailed", REDACTOR.scrub(condition.get("message") or "")[:512]
    return "JobFailed", "the backup Job failed"


def read_job(api: kube.Api, namespace: str, name: str) -> dict[str, Any] | None:
    """The Job, or None when it does not exist."""
    return api.get(kube.JOBS, namespace, name)


def job_summary(pods: Iterable[Mapping[str, Any]], key: str) -> dict[str, Any] | None:
    """The agent's one-line JSON summary (the object under ``key``) from its pods' termination messages."""
    for message in termination_messages(pods):
        for line in reversed(message.strip().splitlines()):
            try:
                document = json.loads(line)
            except ValueError:
                continue
            if isinstance(document, dict) and isinstance(document.get(key), dict):
                summary: dict[str, Any] = document[key]
                return summary
    return None


def job_pods(api: kube.Api, namespace: str, job: str) -> list[dict[str, Any]]:
    """The Job's pods (their termination messages carry the agent's last line)."""
    return api.list(kube.PODS, namespace, labels=f"batch.kubernetes.io/job-name={job}")
