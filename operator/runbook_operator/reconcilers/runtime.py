"""The one reconcile contract and the runtime that drives every kind.

A kind is a ``Reconciler``: its resource, spec and status models and ``reconcile(ctx) -> Result``
(optionally ``finalize``). ``drive`` runs one pass in the operator's executor: it builds the ``Context``
(the API, the object, its parsed spec and typed status), calls the function, turns any failure into
``Ready=False`` with an Event, and writes the status fields that changed, once. kopf handlers call
``drive`` and ``as_kopf``; kinds that act on time (rotation, scaling, restores, drills) run in a
``Clocks`` loop that sleeps for the ``Result``'s ``requeue_after``.

    def reconcile(ctx: Context[MySpec, MyStatus]) -> Result:
        thing = ctx.api.get(kube.CONFIG_MAPS, ctx.namespace, ctx.spec.config_name)
        if thing is None:
            raise RunbookError("ConfigMapNotFound", "spec.configName: ConfigMap not found", retry_after=30)
        ctx.status.phase = MyPhase.READY
        ctx.condition("Ready", "True", "Reconciled")
        return Result.after(300)
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import kopf
from kubernetes.client import ApiException
from pydantic import BaseModel

from .. import metrics
from ..clients import events, kube
from ..conditions import ConditionStatus, set_condition
from ..errors import RunbookError, parse_spec
from ..logs import REDACTOR
from ..models.common import CamelModel, Condition, StatusBase
from ..settings import CONTAINMENT_WORKERS
from .interlock import holder_from_index
from .tenancy import Grant, grants_for, index_entries

LOG = logging.getLogger(__name__)
S = TypeVar("S", bound=CamelModel)
T = TypeVar("T", bound=StatusBase)
R = TypeVar("R")

UNEXPECTED_RETRY = 10.0  # first retry after a failure nobody foresaw (an API refusal, a bug); doubles
MAX_BACKOFF = 300.0
_API_REASONS = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict", 422: "Invalid"}


def utc_now() -> datetime:
    return datetime.now(UTC)


# --- the executor -----------------------------------------------------------------------------------------
# Every blocking call (the Kubernetes client, S3, PostgreSQL, Redis, gpg) runs here, never on asyncio's
# default executor, which kopf does not size. kopf's own sync handlers use the same pool, sized by
# RUNBOOK_MAX_WORKERS (main.py startup).
# Nothing sleeps in it: a step that waits returns ``Result.after`` instead.
EXECUTOR = ThreadPoolExecutor(max_workers=20, thread_name_prefix="runbook")
# Containment's own pool (an EmergencyIsolation's deny-all policy: its first create and the guard that puts it
# back): never behind other objects' passes, nor behind a slow S3 or database call filling EXECUTOR.
CONTAINMENT = ThreadPoolExecutor(max_workers=CONTAINMENT_WORKERS, thread_name_prefix="runbook-contain")


async def blocking(function: Callable[..., R], *args: Any, executor: Executor = EXECUTOR) -> R:
    """``function(*args)`` in the operator's executor (or ``executor``: ``CONTAINMENT``), with the caller's
    context variables (log context)."""
    call = functools.partial(contextvars.copy_context().run, function, *args)
    return await asyncio.get_running_loop().run_in_executor(executor, call)


# --- results and failures -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    """What one pass decided. ``requeue_after``: seconds until the next pass (None: until something changes);
    ``finished``: the object never needs another pass (a restore that ended); ``error``: this pass failed
    (already reported in status and as an Event)."""

    requeue_after: float | None = None
    finished: bool = False
    error: RunbookError | None = None

    @classmethod
    def done(cls) -> Result:
        return cls()

    @classmethod
    def after(cls, seconds: float) -> Result:
        return cls(requeue_after=max(float(seconds), 0.0))

    @classmethod
    def stop(cls) -> Result:
        return cls(finished=True)

    @classmethod
    def failed(cls, error: RunbookError, failures: int) -> Result:
        """Retry after the error's ``retry_after`` doubled per consecutive failure, or wait for a change."""
        delay = None if error.retry_after is None else backoff(error.retry_after, failures)
        return cls(requeue_after=delay, error=error)


def backoff(base: float, failures: int) -> float:
    """Seconds before retry number ``failures`` (1, 2, ...): doubling from ``base``, capped."""
    return float(min(base * 2 ** max(failures - 1, 0), MAX_BACKOFF))


def as_failure(error: BaseException) -> RunbookError:
    """Any failure as what the user sees: a RunbookError as it is; an API server refusal with its HTTP status
    and the API server's own one-line message (it names the verb, resource, namespace and user); anything
    else by its type and first line. Never a secret: every registered value is scrubbed."""
    if isinstance(error, RunbookError):
        scrubbed = REDACTOR.scrub(error.message)
        if scrubbed == error.message:
            return error
        return RunbookError(error.reason, scrubbed, retry_after=error.retry_after)
    if isinstance(error, ApiException):
        reason = _API_REASONS.get(error.status or 0, "APIError")
        detail = f"Kubernetes API: HTTP {error.status}: {kube.server_message(error)}"
    else:
        reason = "InternalError"
        lines = str(error).strip().splitlines()
        detail = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return RunbookError(reason, REDACTOR.scrub(detail)[:1024], retry_after=UNEXPECTED_RETRY)


def as_kopf(result: Result, *, retry: int = 0) -> None:
    """A kopf handler's ending for ``result``: return when done, else the kopf error that retries later
    (``retry``: kopf's count of earlier retries, for the backoff) or waits for a spec change."""
    if result.error is None:
        if result.requeue_after is None:
            return
        raise kopf.TemporaryError("requeued", delay=result.requeue_after)
    if result.error.retry_after is None:
        raise kopf.PermanentError(result.error.message)
    raise kopf.TemporaryError(result.error.message, delay=backoff(result.error.retry_after, retry + 1))


# --- status -----------------------------------------------------------------------------------------------
def _wire(status: BaseModel) -> dict[str, Any]:
    return status.model_dump(by_alias=True, exclude_unset=True, exclude_none=True, mode="json")


def merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``: changed keys, removed ones as null."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = merge_diff(before, value)
            if nested:
                patch[key] = nested
        elif key not in old or before != value:
            patch[key] = value
    return patch


Isolation = Callable[[str], str | None]  # the EmergencyIsolation holding a namespace, or None


def holder_by_listing(api: kube.Api) -> Isolation:
    """``Context.isolation`` without kopf's index (tools, tests): the index's answer over one LIST."""
    isolations = kube.custom_resource("emergencyisolations", "EmergencyIsolation")
    return lambda namespace: holder_from_index({namespace: api.list(isolations, namespace)})(namespace)


GrantsOf = Callable[[str], tuple[Grant, ...]]  # the RunbookGrants that apply to a namespace
GRANTS = kube.custom_resource("runbookgrants", "RunbookGrant")


def grants_by_listing(api: kube.Api) -> GrantsOf:
    """``Context.grants`` without kopf's index (tools, tests): the index's answer over one LIST."""

    def grants(namespace: str) -> tuple[Grant, ...]:
        index: dict[str, list[Grant]] = {}
        for item in api.list(GRANTS, None):
            for listed, grant in index_entries(str(item["metadata"]["name"]), item.get("spec") or {}).items():
                index.setdefault(listed, []).append(grant)
        return grants_for(index, namespace)

    return grants


@dataclass
class Context(Generic[S, T]):
    """One pass over one object: the API, the object as read, its spec (parsed on first use, so an invalid
    spec is reported like any failure) and its status as the typed model the pass edits in place."""

    api: kube.Api
    body: Mapping[str, Any]
    resource: kube.Resource
    spec_model: type[S]
    status: T
    isolation: Isolation
    grants: GrantsOf
    now: Callable[[], datetime] = utc_now
    _written: dict[str, Any] = field(default_factory=dict)
    _spec: S | None = None

    @classmethod
    def of(
        cls,
        reconciler: Reconciler[S, T],
        body: Mapping[str, Any],
        api: kube.Api,
        *,
        isolation: Isolation | None = None,
        grants: GrantsOf | None = None,
        now: Callable[[], datetime] = utc_now,
    ) -> Context[S, T]:
        status = reconciler.status.model_validate(dict(body.get("status") or {}))
        return cls(
            api=api,
            body=body,
            resource=reconciler.resource,
            spec_model=reconciler.spec,
            status=status,
            isolation=isolation or holder_by_listing(api),
            grants=grants or grants_by_listing(api),
            now=now,
            _written=_wire(status),
        )

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def generation(self) -> int | None:
        generation = self.body["metadata"].get("generation")
        return None if generation is None else int(generation)

    @property
    def spec(self) -> S:
        if self._spec is None:
            self._spec = parse_spec(self.spec_model, self.body.get("spec"))
        return self._spec

    def confine(self, confined: S) -> S:
        """The spec as a ``tenancy.confine_*`` call returned it: every later ``ctx.spec`` of the pass is that
        one, so the pass connects only to the hosts the tenancy rules returned."""
        self._spec = confined
        return confined

    def plaintext(self, fields: list[str]) -> None:
        """The ``SecureConnections`` condition: False (reason ``Plaintext``, a Warning) naming each connection
        of ``fields`` that runs without verified TLS (its ``insecurePlaintext`` opt-out), True when none."""
        if fields:
            self.condition(
                "SecureConnections",
                "False",
                "Plaintext",
                f"without verified TLS (insecurePlaintext): {', '.join(fields)}",
            )
        else:
            self.condition("SecureConnections", "True", "Verified", "every connection uses verified TLS")

    def condition(self, type: str, status: ConditionStatus, reason: str, message: str = "") -> None:
        """Set one condition; ``lastTransitionTime`` moves only when its status changes."""
        current = [c.model_dump(by_alias=True, exclude_none=True) for c in self.status.conditions]
        updated = set_condition(
            current, type=type, status=status, reason=reason, message=message, generation=self.generation
        )
        self.status.conditions = [Condition.model_validate(c) for c in updated]

    def event(self, type: str, reason: str, message: str) -> None:
        """A Normal or Warning Event about the object (repetitions count on one Event)."""
        try:
            events.post(self.api, self.body, type=type, reason=reason, message=message)
        except ApiException as refused:  # the status still tells; the log says why the Event is missing
            LOG.warning("cannot post the %s Event: HTTP %s", reason, refused.status)

    def checkpoint(self) -> None:
        """Write the status fields changed since the last write, as one merge patch (no resourceVersion: a
        concurrent writer of other fields is kept); nothing when nothing changed. Steps that later steps rely
        on call it; ``drive`` calls it once at the end of every pass."""
        if self.generation is not None:
            self.status.observed_generation = self.generation
        now = _wire(self.status)
        patch = merge_diff(self._written, now)
        if not patch:
            return
        self.api.patch(self.resource, self.namespace, self.name, {"status": patch}, subresource="status")
        self._written = now

    def fail(self, raised: BaseException) -> RunbookError:
        """Any failure (``as_failure``) as Ready=False with its reason and message, logged once, counted, and
        a Warning Event; returns the RunbookError. The caller's pass ends with the status write."""
        error = as_failure(raised)
        kind = str(self.body.get("kind") or self.resource.kind)
        metrics.RECONCILE_ERRORS.labels(kind).inc()
        LOG.warning("%s %s/%s: %s: %s", kind, self.namespace, self.name, error.reason, error.message)
        self.condition("Ready", "False", error.reason, error.message)
        self.event("Warning", error.reason, error.message)
        return error


@dataclass(frozen=True)
class Reconciler(Generic[S, T]):
    """A kind: where it lives, its models, its pass and (if deletion needs work) its finalizer pass."""

    resource: kube.Resource
    spec: type[S]
    status: type[T]
    reconcile: Callable[[Context[S, T]], Result]
    finalize: Callable[[Context[S, T]], Result] | None = None


def run_pass(ctx: Context[S, T], step: Callable[[Context[S, T]], Result], *, failures: int = 0) -> Result:
    """One pass, blocking: ``step``, any failure reported (``Context.fail``), then the status write."""
    try:
        result = step(ctx)
    except Exception as raised:
        result = Result.failed(ctx.fail(raised), failures + 1)
    try:
        ctx.checkpoint()
    except ApiException as error:
        if error.status == 404:  # deleted during the pass: nothing left to report on
            return Result.stop()
        raise
    metrics.RECONCILE_PASSES.labels(ctx.resource.kind).inc()  # a positive marker for no-op resync tests
    return result


async def drive(
    reconciler: Reconciler[S, T],
    body: Mapping[str, Any],
    *,
    api: kube.Api | None = None,
    finalizing: bool = False,
    failures: int = 0,
    isolation: Isolation | None = None,
    grants: GrantsOf | None = None,
) -> Result:
    """One pass over ``body`` in the executor (``finalizing``: the kind's finalizer instead)."""
    step = reconciler.finalize if finalizing else reconciler.reconcile
    assert step is not None, f"{reconciler.resource.kind} has no finalizer"

    def work() -> Result:
        ctx = Context.of(reconciler, body, api or kube.KubeApi(), isolation=isolation, grants=grants)
        return run_pass(ctx, step, failures=failures)

    return await blocking(work)


async def drive_current(
    reconciler: Reconciler[S, T],
    namespace: str,
    name: str,
    *,
    api: kube.Api | None = None,
    failures: int = 0,
    isolation: Isolation | None = None,
    grants: GrantsOf | None = None,
) -> Result:
    """One pass over the object as the API server has it now (a daemon's copy lags behind our own status
    writes); ``stop`` once it is gone or being deleted (its finalizer takes over)."""
    client = api or kube.KubeApi()
    body = await blocking(client.get, reconciler.resource, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Result.stop()
    return await drive(reconciler, body, api=client, failures=failures, isolation=isolation, grants=grants)


async def run_clock(
    clocks: Clocks,
    reconciler: Reconciler[S, T],
    body: Mapping[str, Any],
    *,
    stopped: kopf.DaemonStopped,
    api: kube.Api | None = None,
    isolation: Isolation | None = None,
    grants: GrantsOf | None = None,
) -> None:
    """The object's clock (a kopf daemon): ``drive_current`` pass after pass, each when the last asked."""
    namespace, name = str(body["metadata"]["namespace"]), str(body["metadata"]["name"])

    async def once(failures: int) -> Result:
        return await drive_current(
            reconciler, namespace, name, api=api, failures=failures, isolation=isolation, grants=grants
        )

    await clocks.run(namespace=namespace, name=name, stopped=stopped, reconcile=once)


async def finalize_current(
    clocks: Clocks,
    reconciler: Reconciler[S, T],
    body: Mapping[str, Any],
    *,
    retry: int,
    api: kube.Api | None = None,
    isolation: Isolation | None = None,
    grants: GrantsOf | None = None,
) -> None:
    """kopf's deletion handler: after any pass of the object's clock, the finalizer on the object as it is now,
    ended as kopf expects (``as_kopf``)."""
    namespace, name = str(body["metadata"]["namespace"]), str(body["metadata"]["name"])
    client = api or kube.KubeApi()
    async with clocks.lock(namespace, name):
        current = await blocking(client.get, reconciler.resource, namespace, name)
        result = await drive(
            reconciler, current or body, api=client, finalizing=True, isolation=isolation, grants=grants
        )
    as_kopf(result, retry=retry)


class Clocks:
    """Per-object loops of one kind: a pass, then sleep until its ``requeue_after``, a wake-up or a stop.

    In-memory coordination only (never state: that is in the API server). ``wake`` is called from the event
    loop, e.g. by an update handler when the spec changes.
    """

    def __init__(self) -> None:
        self._wakes: dict[tuple[str, str], asyncio.Event] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        """Held by the object's loop during a pass (a fresh one when no loop runs): a deletion handler takes
        it so as not to race a pass still in progress (kopf stops daemons and runs deletion handlers
        concurrently)."""
        return self._locks.get((namespace, name)) or asyncio.Lock()

    def wake(self, namespace: str | None, name: str | None = None) -> None:
        """A pass now for the object (or every object of the namespace)."""
        for (ns, object_name), event in self._wakes.items():
            if ns == namespace and name in (None, object_name):
                event.set()

    async def run(
        self,
        *,
        namespace: str,
        name: str,
        stopped: kopf.DaemonStopped,
        reconcile: Callable[[int], Awaitable[Result]],
    ) -> None:
        """Loop until kopf stops the daemon or a pass returns ``finished``. ``reconcile`` gets the number of
        consecutive failed passes before it (for its backoff); an exception that escapes it is logged and
        retried with backoff: never a hot loop, never a dead clock."""
        event = self._wakes.setdefault((namespace, name), asyncio.Event())
        lock = self._locks.setdefault((namespace, name), asyncio.Lock())
        failures = 0
        try:
            while not stopped:
                event.clear()
                async with lock:
                    try:
                        result = await reconcile(failures)
                    except Exception as error:
                        result = Result(requeue_after=backoff(UNEXPECTED_RETRY, failures + 1), error=as_failure(error))
                        LOG.error("%s/%s: %s; retrying in %.0f s", namespace, name, result.error, result.requeue_after)
                failures = failures + 1 if result.error is not None else 0
                if result.finished:
                    return
                woken = asyncio.ensure_future(event.wait())
                stopping = asyncio.ensure_future(stopped.wait())
                _, pending = await asyncio.wait(
                    {woken, stopping}, timeout=result.requeue_after, return_when=asyncio.FIRST_COMPLETED
                )
                for task in pending:
                    task.cancel()
        finally:
            self._wakes.pop((namespace, name), None)
            self._locks.pop((namespace, name), None)
