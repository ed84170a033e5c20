"""What every reconciler shares: parsing specs into models, writing status only when it changes,
reporting failures as conditions and Events."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import kopf
from kubernetes.client import ApiException

from .. import metrics
from ..clients import events, kube
from ..conditions import ConditionStatus, set_condition
from ..errors import RunbookError
from ..errors import parse_spec as parse_spec  # noqa: PLC0414 - re-exported; its kopf-free home is errors.py
from ..logs import REDACTOR
from ..models import GROUP, VERSION

if TYPE_CHECKING:
    pass

LOG = logging.getLogger(__name__)
MERGE_PATCH = "application/merge-patch+json"


class StatusPatch:
    """Collects status changes against the current status; ``apply`` writes only what differs."""

    def __init__(self, status: Any, generation: int | None) -> None:
        self.current: dict[str, Any] = dict(status or {})
        self.generation = generation
        self.changes: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.changes.get(key, self.current.get(key, default))

    def set(self, **fields: Any) -> None:
        for key, value in fields.items():
            if self.current.get(key) != value or key in self.changes:
                self.changes[key] = value

    def condition(self, type: str, status: ConditionStatus, reason: str, message: str = "") -> None:
        conditions = set_condition(
            self.get("conditions"),
            type=type,
            status=status,
            reason=reason,
            message=message,
            generation=self.generation,
        )
        self.set(conditions=conditions)

    def apply(self, patch: kopf.Patch) -> None:
        if self.generation is not None:
            self.set(observedGeneration=self.generation)
        for key, value in self.changes.items():
            patch.status[key] = value

    def write(self, *, plural: str, namespace: str, name: str) -> None:
        """Write the collected changes now, outside kopf's own patch (a checkpoint that later steps rely on);
        afterwards they count as current. Writes nothing when nothing changed."""
        patch = kopf.Patch()
        self.apply(patch)
        if not patch:
            return
        changes = dict(patch["status"])
        kube.custom().patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, plural, name, {"status": changes}, _content_type=MERGE_PATCH
        )
        self.current.update(changes)
        self.changes = {}


UNEXPECTED_RETRY = 10.0  # first retry after a failure nobody foresaw (an API refusal, a bug); doubles
MAX_BACKOFF = 300.0
_API_REASONS = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict", 422: "Invalid"}


def backoff(base: float, failures: int) -> float:
    """Seconds before retry number ``failures`` (1, 2, ...): doubling from ``base``, capped."""
    return float(min(base * 2 ** max(failures - 1, 0), MAX_BACKOFF))


def as_failure(error: Exception) -> RunbookError:
    """Any failure as what the user sees: a RunbookError as it is; an API server refusal with its HTTP status
    and the API server's own one-line message (it names the verb, resource, namespace and user); anything
    else by its type and first line. Never a secret: every registered value is scrubbed."""
    if isinstance(error, RunbookError):
        return error
    if isinstance(error, ApiException):
        try:
            said = str(json.loads(error.body or "{}").get("message") or error.reason)
        except (ValueError, AttributeError):
            said = str(error.reason)
        reason = _API_REASONS.get(error.status or 0, "APIError")
        detail = f"Kubernetes API: HTTP {error.status}: {said}"
    else:
        reason = "InternalError"
        lines = str(error).strip().splitlines()
        detail = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return RunbookError(reason, REDACTOR.scrub(detail)[:1024], retry_after=UNEXPECTED_RETRY)


def report_failure(
    body: kopf.Body, status: StatusPatch, raised: Exception, *, phase: str | None = None
) -> RunbookError:
    """Any failure (``as_failure``) as Ready=False with its reason and message, and a Warning Event (a
    repetition counts on the same Event); returns the RunbookError. The caller writes the status."""
    error = as_failure(raised)
    metrics.RECONCILE_ERRORS.labels(str(body.get("kind"))).inc()
    metadata = body["metadata"]
    LOG.warning(
        "%s %s/%s: %s: %s", body.get("kind"), metadata["namespace"], metadata["name"], error.reason, error.message
    )
    status.condition("Ready", "False", error.reason, error.message)
    if phase is not None:
        status.set(phase=phase)
    try:
        events.post(kube.KubeApi(), body, type="Warning", reason=error.reason, message=error.message)
    except ApiException as refused:  # the condition still tells; the log says why the Event is missing
        LOG.warning("cannot post the %s Event: HTTP %s", error.reason, refused.status)
    return error


def retry_or_stop(error: RunbookError, *, retry: int = 0) -> kopf.TemporaryError | kopf.PermanentError:
    """The kopf error that retries later with backoff (``retry``: kopf's count of earlier retries) or waits
    for a spec change."""
    if error.retry_after is not None:
        return kopf.TemporaryError(error.message, delay=backoff(error.retry_after, retry + 1))
    return kopf.PermanentError(error.message)


class Clocks:
    """Per-object daemon loops of one kind: reconcile, then sleep until a delay passes, a wake-up or a stop.

    In-memory coordination only (never state: that is in the API server). ``wake`` is called from the
    event loop, e.g. by an update handler when the spec changes.
    """

    def __init__(self) -> None:
        self._wakes: dict[tuple[str, str], asyncio.Event] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        """Held by the object's loop while it reconciles (a fresh one when no loop runs): a deletion handler
        takes it so as not to race a reconcile still in progress (kopf stops daemons and runs deletion
        handlers concurrently)."""
        return self._locks.get((namespace, name)) or asyncio.Lock()

    def wake(self, namespace: str | None, name: str | None = None) -> None:
        """Reconcile the object now (or every object of the namespace)."""
        for (ns, object_name), event in self._wakes.items():
            if ns == namespace and name in (None, object_name):
                event.set()

    async def run(
        self,
        *,
        namespace: str,
        name: str,
        stopped: kopf.DaemonStopped,
        reconcile: Callable[[], Awaitable[float | None]],
    ) -> None:
        """Loop until kopf stops the daemon; ``reconcile`` returns the seconds to sleep (None: until woken).
        A RunbookError it raises (already reported in status) is retried after its ``retry_after``, doubled
        per consecutive failure; any other exception is logged and retried the same way: never a hot loop,
        never a dead clock."""
        event = self._wakes.setdefault((namespace, name), asyncio.Event())
        lock = self._locks.setdefault((namespace, name), asyncio.Lock())
        failures = 0
        try:
            while not stopped:
                event.clear()
                async with lock:
                    try:
                        delay = await reconcile()
                        failures = 0
                    except RunbookError as error:
                        failures += 1
                        delay = None if error.retry_after is None else backoff(error.retry_after, failures)
                    except Exception as error:
                        failures += 1
                        delay = backoff(UNEXPECTED_RETRY, failures)
                        LOG.error("%s/%s: %s; retrying in %.0f s", namespace, name, as_failure(error).message, delay)
                woken = asyncio.ensure_future(event.wait())
                stopping = asyncio.ensure_future(stopped.wait())
                _, pending = await asyncio.wait({woken, stopping}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
        finally:
            self._wakes.pop((namespace, name), None)
            self._locks.pop((namespace, name), None)
