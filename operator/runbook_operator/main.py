"""The only module with kopf decorators. Handlers parse, delegate to a reconciler and return nothing
(kopf would copy a return value into status): every decision lives in ``reconcilers/``."""

from __future__ import annotations

from typing import Any

import kopf

from . import metrics
from .builders.backup import POLICY_LABEL as BACKUP_POLICY_LABEL
from .builders.isolation import ISOLATION_LABEL
from .diffbase import LeanDiffBaseStorage
from .logs import install_redactor
from .models import GROUP, VERSION
from .reconcilers import backup, containment, drills, interlock, isolation, restore, rotation, scaling, wal
from .reconcilers.runtime import EXECUTOR, GrantsOf, as_kopf, drive, finalize_current, run_clock
from .reconcilers.tenancy import Grant, grants_from_index, index_entries
from .settings import Settings, configure_kopf

SETTINGS = Settings.from_env()
# The namespaces kopf watches ([]: every one), as cli.py passed them to kopf.run; None when kopf was started
# otherwise (``kopf run -m``): then the containment watch knows its scope only from kopf's own cluster-wide flag.
SCOPE: list[str] | None = None


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.execution.executor = EXECUTOR  # kopf's sync handlers and every blocking call share one pool
    configure_kopf(settings, SETTINGS)  # sized by RUNBOOK_MAX_WORKERS
    diffbase = settings.persistence.diffbase_storage
    if isinstance(diffbase, kopf.AnnotationsDiffBaseStorage):  # the same essence, without copying what it drops
        settings.persistence.diffbase_storage = LeanDiffBaseStorage.like(diffbase, groups=compared_groups())
    settings.watching.label_selectors[ISOLATION_POLICIES[0], ISOLATION_POLICIES[2]] = ISOLATION_LABEL  # the guard's
    for group, _version, plural in (BACKUP_CRON_JOBS, BACKUP_JOBS):  # only the BackupPolicies' (not every Job's)
        settings.watching.label_selectors[group, plural] = BACKUP_POLICY_LABEL
    # kopf keeps an object's worker (its queue, task and frames) this long after its last event (default 5 s):
    # 1,000 policies created in 10 s kept ~1,000 of them alive at once; our own write's event comes within 1 s
    settings.queueing.idle_timeout = 1.0
    install_redactor()
    metrics.serve(SETTINGS.metrics_port)


def compared_groups(registry: kopf.OperatorRegistry | None = None) -> set[str] | None:
    """The API groups of the kinds whose essence kopf compares between events: those with change handlers
    (create, update, delete, resume) or daemons, as kopf's registry has them (private: ``_changing``,
    ``_spawning``); None (every group) when a handler names no group."""
    registry = registry or kopf.get_default_registry()
    handlers = [*registry._changing.get_all_handlers(), *registry._spawning.get_all_handlers()]
    groups = {handler.selector.group if handler.selector is not None else None for handler in handlers}
    return None if None in groups else {str(group) for group in groups}


@kopf.on.probe(id="handlers")
def probe_handlers(**_: Any) -> str:
    return "ok"


# --- indexes ---
# kopf passes each index to every handler, daemon and timer as a keyword argument named after its function
# (``kwargs["isolations_by_namespace"]``: mypy checks handlers against kopf's protocols, which name no index);
# ``interlock.holder_from_index`` turns it into ``runtime.drive(..., isolation=...)``'s "which
# EmergencyIsolation holds this namespace?". Every handler that does no I/O is ``async``: kopf runs a sync one in
# the shared executor, where slow passes of other objects (a silent S3 endpoint) would delay it.
@kopf.index(GROUP, VERSION, "emergencyisolations")
async def isolations_by_namespace(body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
    return {str(body["metadata"]["namespace"]): interlock.index_entry(body)}


def _grants(kwargs: dict[str, Any]) -> GrantsOf:
    """``runtime.drive(..., grants=...)`` from kopf's index ``grants_by_namespace`` (the RunbookGrant section)."""
    return grants_from_index(kwargs["grants_by_namespace"])


# --- ScalingProfile ---
SCALING_PROFILES = (GROUP, VERSION, "scalingprofiles")


@kopf.daemon(*SCALING_PROFILES, cancellation_timeout=60)
async def scaling_profile_clock(body: kopf.Body, stopped: kopf.DaemonStopped, **kwargs: Any) -> None:
    isolation = interlock.holder_from_index(kwargs["isolations_by_namespace"])
    await run_clock(scaling.CLOCKS, scaling.PROFILE, body, stopped=stopped, isolation=isolation, grants=_grants(kwargs))


@kopf.on.update(*SCALING_PROFILES, field="spec")
async def scaling_profile_changed(body: kopf.Body, **_: Any) -> None:
    scaling.CLOCKS.wake(body.metadata.namespace, body.metadata.name)


@kopf.on.delete(*SCALING_PROFILES)
async def scaling_profile_deleted(body: kopf.Body, retry: int, **kwargs: Any) -> None:
    await finalize_current(scaling.CLOCKS, scaling.PROFILE, body, retry=retry, grants=_grants(kwargs))


# --- EmergencyIsolation ---
# Every pass is level-based (reads the cluster, converges), so create, resume and spec changes share one
# handler (``isolation.ISOLATION``); deletion goes through kopf's finalizer, which holds the object until the
# release succeeded, also when it was deleted while the operator was down. Which isolation holds a namespace
# comes from the index, not a LIST. Containment first, off kopf's queues: a watch of its own
# (``containment.ContainmentWatch``, started below) creates a new isolation's policy on its ADDED event, and
# kopf's first event of it finds that done (``isolation.contain_new``; without the watch, that event creates
# it), before kopf adds its finalizer and before the pass; the guard is a watch on the operator's
# emergency-isolate policies (by label, server-side) that puts one deleted or edited back at once
# (``isolation.put_back``). No timer: idle, no call.
EMERGENCY_ISOLATIONS = (GROUP, VERSION, "emergencyisolations")
ISOLATION_POLICIES = ("networking.k8s.io", "v1", "networkpolicies")


@kopf.index(*EMERGENCY_ISOLATIONS)
async def isolation_guards(body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
    return {str(body["metadata"]["namespace"]): isolation.guard_entry(body)}


@kopf.on.startup()
async def emergency_isolation_fast_path_ready(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
    await isolation.loop_client()  # its TLS files and auth header read now, not in the first burst
    if SETTINGS.containment_watch:  # kopf runs only in the Lease's holder (cli.py), so only the leader contains
        scope = SCOPE if SCOPE is not None else ([] if settings.peering.clusterwide else None)
        containment.start(scope, grants=_grants(kwargs), watch_seconds=SETTINGS.watch_timeout)


@kopf.on.cleanup()
async def emergency_isolation_fast_path_closed(**_: Any) -> None:
    await containment.stop()  # no new containment begins; those under way end below
    await isolation.close_loop_client()


@kopf.on.event(*ISOLATION_POLICIES, labels={ISOLATION_LABEL: kopf.PRESENT})
async def emergency_isolation_guard(type: str, body: kopf.Body, **kwargs: Any) -> None:
    namespace = str(body.metadata.namespace)
    guarded = isolation.guarded_isolation(type, body, kwargs["isolation_guards"].get(namespace, ()))
    if guarded is not None:
        await isolation.put_back(namespace, guarded, grants=_grants(kwargs))


_HOLDING: dict[str, bool] = {}  # an isolation's uid -> whether its guard entry held a policy at its last event


# Every event of an isolation, in this order: containment first (a new isolation's policy), then the guard,
# then the clocks that follow isolations (the interlock). One handler, not four: kopf builds its keyword
# arguments and logs a line per handler and event, and containment waits for that work of every isolation
# whose event came before (100 created at once).
@kopf.on.event(*EMERGENCY_ISOLATIONS)
async def emergency_isolation_event(type: str, body: kopf.Body, **kwargs: Any) -> None:
    namespace, grants = str(body.metadata.namespace), _grants(kwargs)
    if type != "DELETED" and isolation.awaits_containment(body):  # begun by the containment watch: waited for
        holder = interlock.holder_from_index(kwargs["isolations_by_namespace"])
        await isolation.contain_new(body, isolation=holder, grants=grants)
        # kopf adds its finalizer once this returns: after the creates of a burst (100 at once: its create p95
        # 160-230 ms with the patches held back, 310 ms without), never more than SETTLE_AT_MOST later
        await isolation.containment_settled()
    else:
        isolation.forget_containment(str(body.metadata.uid))
    await _guard_armed(type, body, grants)
    scaling.CLOCKS.wake(namespace)
    rotation.CLOCKS.wake(namespace)


async def _guard_armed(type: str, body: kopf.Body, grants: GrantsOf) -> None:
    """When an isolation starts to hold its policy (its status says Isolated), the guard looks once: a policy
    deleted between the status write and this event had its DELETED event before the guard held it."""
    uid = str(body.metadata.uid)
    if type == "DELETED":
        _HOLDING.pop(uid, None)
        return
    holds = isolation.guard_entry(body)["policy"] is not None
    held, _HOLDING[uid] = _HOLDING.get(uid, False), holds
    if holds and not held:
        await isolation.put_back(str(body.metadata.namespace), str(body.metadata.name), grants=grants)


@kopf.on.resume(*EMERGENCY_ISOLATIONS)
@kopf.on.create(*EMERGENCY_ISOLATIONS)
@kopf.on.update(*EMERGENCY_ISOLATIONS, field="spec")
async def emergency_isolation(body: kopf.Body, retry: int, **kwargs: Any) -> None:
    await isolation.containment_settled()
    holder = interlock.holder_from_index(kwargs["isolations_by_namespace"])
    as_kopf(await drive(isolation.ISOLATION, body, isolation=holder, grants=_grants(kwargs)), retry=retry)


@kopf.on.delete(*EMERGENCY_ISOLATIONS)
async def emergency_isolation_deleted(body: kopf.Body, retry: int, **kwargs: Any) -> None:
    as_kopf(await drive(isolation.ISOLATION, body, finalizing=True, grants=_grants(kwargs)), retry=retry)


# --- SecretRotation ---
# One clock per resource (``rotation.ROTATION`` driven by ``runtime.Clocks``) sleeps until the next rotation
# is due or a rollout is looked at again; spec changes (rotateNow) and changes of an EmergencyIsolation in the
# namespace (the interlock) wake it. Deletion settles a rotation in flight through the same runtime.
SECRET_ROTATIONS = (GROUP, VERSION, "secretrotations")


@kopf.daemon(*SECRET_ROTATIONS, cancellation_timeout=60)
async def secret_rotation_clock(body: kopf.Body, stopped: kopf.DaemonStopped, **kwargs: Any) -> None:
    isolation = interlock.holder_from_index(kwargs["isolations_by_namespace"])
    await run_clock(
        rotation.CLOCKS, rotation.ROTATION, body, stopped=stopped, isolation=isolation, grants=_grants(kwargs)
    )


@kopf.on.update(*SECRET_ROTATIONS, field="spec")
async def secret_rotation_changed(body: kopf.Body, **_: Any) -> None:
    rotation.CLOCKS.wake(body.metadata.namespace, body.metadata.name)


@kopf.on.delete(*SECRET_ROTATIONS)
async def secret_rotation_deleted(body: kopf.Body, retry: int, **kwargs: Any) -> None:
    await finalize_current(rotation.CLOCKS, rotation.ROTATION, body, retry=retry, grants=_grants(kwargs))


@kopf.on.event(*SECRET_ROTATIONS)
async def secret_rotation_gone(type: str, body: kopf.Body, **_: Any) -> None:
    if type == "DELETED":
        metrics.forget_secret_rotation(str(body.metadata.namespace), str(body.metadata.name))


# --- BackupPolicy ---
# Level-triggered: ``backup.PASSES`` runs a pass when something it depends on changed (the generation, the
# backup-now token, the CronJob edited or deleted by hand, a Job started or finished) and times its own retries
# and re-checks; every other event costs no API call. Only event handlers here: kopf's change handlers would
# store their last-handled-configuration annotation, and a timer or daemon a finalizer, on every policy.
BACKUP_POLICIES = (GROUP, VERSION, "backuppolicies")
BACKUP_DELETION_ATTEMPTS = 6  # then the policy goes, and its backups stay (the last Warning says why)


BACKUP_CRON_JOBS = ("batch", "v1", "cronjobs")
BACKUP_JOBS = ("batch", "v1", "jobs")  # both watched by label, server-side (startup)


# Whether a policy's CronJob exists, and its Jobs, come from these indexes (``backup.Watched``), not a GET (a 404
# for a new policy) and a LIST: kopf fills every index from its initial listing before it runs any handler.
@kopf.index(*BACKUP_CRON_JOBS, labels={BACKUP_POLICY_LABEL: kopf.PRESENT})
async def backup_cronjobs(body: kopf.Body, **_: Any) -> dict[tuple[str, str], str]:
    return backup.cronjob_index_entry(body)


@kopf.index(*BACKUP_JOBS, labels={BACKUP_POLICY_LABEL: kopf.PRESENT})
async def backup_jobs(body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return backup.job_index_entry(body)


def _backup_passes(kwargs: dict[str, Any]) -> backup.Passes:
    backup.PASSES.watching(kwargs["backup_cronjobs"], kwargs["backup_jobs"])
    return backup.PASSES


@kopf.on.event(*BACKUP_POLICIES)
async def backup_policy(type: str, body: kopf.Body, **kwargs: Any) -> None:
    await _backup_passes(kwargs).policy_event(type, body, _grants(kwargs))


@kopf.on.event(*BACKUP_CRON_JOBS, labels={BACKUP_POLICY_LABEL: kopf.PRESENT})
async def backup_cronjob(type: str, body: kopf.Body, **kwargs: Any) -> None:
    await _backup_passes(kwargs).cronjob_event(type, body, _grants(kwargs))


@kopf.on.event(*BACKUP_JOBS, labels={BACKUP_POLICY_LABEL: kopf.PRESENT})
async def backup_job(type: str, body: kopf.Body, **kwargs: Any) -> None:
    await _backup_passes(kwargs).job_event(type, body, _grants(kwargs))


@kopf.on.delete(
    *BACKUP_POLICIES,
    when=lambda spec, **_: backup.needs_finalizer(spec) or wal.needs_finalizer(spec),
    retries=BACKUP_DELETION_ATTEMPTS,
)
async def backup_policy_deleted(body: kopf.Body, retry: int, **kwargs: Any) -> None:
    if wal.needs_finalizer(body.get("spec") or {}):  # the replication slot first (else the server keeps WAL)
        as_kopf(await drive(wal.POLICY, body, finalizing=True, failures=retry, grants=_grants(kwargs)), retry=retry)
    as_kopf(await drive(backup.POLICY, body, finalizing=True, failures=retry, grants=_grants(kwargs)), retry=retry)


# --- BackupRestore ---
# One clock per BackupRestore walks its step table (status holds the state, so a restart resumes); it ends
# once the restore has finished; deleting one mid-way brings the workloads back (the finalizer). One clock
# per BackupPolicy with verification creates the drills.
BACKUP_RESTORES = (GROUP, VERSION, "backuprestores")


@kopf.daemon(*BACKUP_RESTORES, cancellation_timeout=60)
async def backup_restore(body: kopf.Body, stopped: kopf.DaemonStopped, **kwargs: Any) -> None:
    await run_clock(restore.CLOCKS, restore.RESTORE, body, stopped=stopped, grants=_grants(kwargs))


@kopf.on.delete(*BACKUP_RESTORES)
async def backup_restore_deleted(body: kopf.Body, retry: int, **kwargs: Any) -> None:
    await finalize_current(restore.CLOCKS, restore.RESTORE, body, retry=retry, grants=_grants(kwargs))


@kopf.daemon(GROUP, VERSION, "backuppolicies", id="drills", when=drills.drills_enabled, cancellation_timeout=30)
async def backup_policy_drills(body: kopf.Body, stopped: kopf.DaemonStopped, **kwargs: Any) -> None:
    await drills.run(body, stopped=stopped, grants=_grants(kwargs))


# --- RunbookGrant ---
# Cluster-scoped and written by cluster administrators only (the operator's RBAC on them is get/list/watch):
# an index namespace -> the grants that list it. Every handler above passes ``_grants(kwargs)`` to the runtime,
# and each pass confines its spec with ``ctx.grants(namespace)`` (``tenancy.confine_*``); nothing writes a grant.
@kopf.index(GROUP, VERSION, "runbookgrants")
async def grants_by_namespace(name: str, spec: kopf.Spec, **_: Any) -> dict[str, Grant]:
    return index_entries(name, spec)
