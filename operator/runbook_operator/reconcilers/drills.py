"""Restore drills: the policy side. A clock per BackupPolicy with ``verification`` creates the drill (a
BackupRestore of the newest backup into the scratch target) of each scheduled time, keeps the last few, and
when a drill ends ``record_drill`` writes its outcome into the policy's status (``Verified``, and
``lastVerifiedBackup`` when it passed) through the status writer: a merge patch of the changed fields, which
the policy's own reconciler writing other fields does not conflict with."""

from __future__ import annotations

import ipaddress
import logging
import socket
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import kopf
from croniter import croniter

from .. import metrics
from ..builders.restore import DRILL_HISTORY, DRILL_LABEL, build_drill
from ..clients import kube
from ..errors import RunbookError
from ..models.backup import (
    RESTORE_ENDED,
    BackupPolicySpec,
    BackupPolicyStatus,
    BackupRestoreStatus,
    RestoreChecks,
    RestorePhase,
    VerifiedBackup,
)
from ..models.common import Condition, parse_time
from . import runtime, tenancy
from .restore import POLICIES, RESTORES
from .runtime import Context, Reconciler, Result

LOG = logging.getLogger(__name__)
FAILURE_RETRY = 30.0  # first retry of a drill pass that failed unforeseen; doubles
PolicyCtx = Context[BackupPolicySpec, BackupPolicyStatus]


def schedule_drills(ctx: PolicyCtx) -> Result:
    """Create the drill of the newest scheduled time that has none yet; wait until the next one. Writes no
    status: the policy's reconciler owns it."""
    try:
        written = ctx.spec
    except RunbookError:
        return Result.after(300)  # the policy's reconciler reports it
    # the drill's target as the tenancy rules allow it (a refusal: the policy's reconciler reports it too)
    spec = tenancy.confine_backup_policy(ctx.api, ctx.grants(ctx.namespace), ctx.namespace, written)
    if spec.verification is None:
        return Result.after(3600)
    now = ctx.now().astimezone(zoneinfo.ZoneInfo(spec.verification.time_zone))
    previous: datetime = croniter(spec.verification.schedule, now).get_prev(datetime)
    upcoming: datetime = croniter(spec.verification.schedule, now).get_next(datetime)
    created = parse_time(ctx.body["metadata"]["creationTimestamp"])
    if created is not None and previous >= created:
        drill = build_drill(ctx.body, spec.verification, previous)
        if ctx.api.create(RESTORES, ctx.namespace, drill):
            ctx.event("Normal", "DrillStarted", f"BackupRestore {drill['metadata']['name']}")
    drills = ctx.api.list(RESTORES, ctx.namespace, labels=f"{DRILL_LABEL}={ctx.name}")
    finished = sorted(
        (d for d in drills if (d.get("status") or {}).get("phase") in RESTORE_ENDED),
        key=lambda d: str(d["metadata"]["creationTimestamp"]),
    )
    for old in finished[:-DRILL_HISTORY]:
        ctx.api.delete(RESTORES, ctx.namespace, old["metadata"]["name"])
    return Result.after(max(1.0, (upcoming - now).total_seconds()))


DRILLS = Reconciler(POLICIES, BackupPolicySpec, BackupPolicyStatus, schedule_drills)
CLOCKS = runtime.Clocks()


def _as_status_of(body: Mapping[str, Any]) -> dict[str, Any]:
    """The policy as the writer of a few status fields sees it: generation as its status last observed it,
    so ``observedGeneration`` (the policy reconciler's) is never moved from here."""
    observed = (body.get("status") or {}).get("observedGeneration")
    return {**body, "metadata": {**body["metadata"], "generation": observed}}


def record_drill(
    api: kube.Api, namespace: str, policy: str, *, restore: str, status: BackupRestoreStatus, ready: Condition
) -> None:
    """The drill's outcome on its policy: Verified, and lastVerifiedBackup when it passed."""
    body = api.get(POLICIES, namespace, policy)
    if body is None:
        return
    ctx = Context.of(DRILLS, _as_status_of(body), api)
    before = ctx.status.model_dump()
    passed = status.phase == RestorePhase.SUCCEEDED
    if passed:
        checks = status.checks or RestoreChecks()
        verified = VerifiedBackup(
            key=str(status.backup_key or "").rsplit("/", 1)[0] + "/",
            backup_time=status.backup_time,
            verified_time=status.completion_time,
            restore=restore,
            tables=checks.tables,
            rows=checks.rows,
            keys=checks.keys,
        )
        ctx.status.last_verified_backup = verified
        found = f"{verified.tables} tables, {verified.rows} rows" if verified.keys is None else f"{verified.keys} keys"
        message = f"drill {restore} restored {verified.key} into {status.target}: {found} match the manifest"
        ctx.condition("Verified", "True", "DrillPassed", message)
    else:
        ctx.condition("Verified", "False", ready.reason, f"drill {restore}: {ready.message}")
    if ctx.status.model_dump() == before:
        return
    ctx.checkpoint()
    if passed:
        when = parse_time(status.completion_time)
        if when is not None:
            metrics.BACKUP_LAST_VERIFIED.labels(namespace, policy).set(when.timestamp())
    metrics.BACKUP_LAST_DRILL_PASSED.labels(namespace, policy).set(int(passed))
    verified_condition = next(c for c in ctx.status.conditions if c.type == "Verified")
    if verified_condition.status == "True":
        ctx.event("Normal", "Verified", verified_condition.message or "")
    else:
        ctx.event("Warning", "DrillFailed", verified_condition.message or "")


def drills_enabled(spec: kopf.Spec, **_: Any) -> bool:
    return bool(spec.get("verification"))


def _pass(api: kube.Api, namespace: str, name: str, failures: int, grants: runtime.GrantsOf | None) -> Result:
    try:
        body = api.get(POLICIES, namespace, name)
        if body is None:
            return Result.after(3600)
        return schedule_drills(Context.of(DRILLS, body, api, grants=grants))
    except Exception as raised:  # the policy's Ready is its reconciler's: only logged, retried with backoff
        error = runtime.as_failure(raised)
        LOG.warning("BackupPolicy %s/%s drills: %s; trying again", namespace, name, error.message)
        return Result(requeue_after=runtime.backoff(FAILURE_RETRY, failures + 1), error=error)


async def run(
    body: kopf.Body,
    *,
    stopped: kopf.DaemonStopped,
    api: kube.Api | None = None,
    grants: runtime.GrantsOf | None = None,
) -> None:
    """The drill clock of one policy with ``verification``."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    client = api or kube.KubeApi()

    async def one(failures: int) -> Result:
        return await runtime.blocking(_pass, client, namespace, name, failures, grants)

    await CLOCKS.run(namespace=namespace, name=name, stopped=stopped, reconcile=one)


# --- a drill's target is never its source ---------------------------------------------------------------
# Names prove nothing (a Service's FQDN, its short name, an IP, localhost): the operator compares where both
# resolve and what the servers say they are, and refuses before anything is restored.


@dataclass(frozen=True)
class Endpoint:
    """A server as a drill's preflight saw it: ``where`` as configured, the addresses it resolves to here,
    the database name (PostgreSQL; None for Redis, whose restore flushes the whole server) and what the server
    says it is (PostgreSQL: system_identifier and the database's OID; Redis: INFO's run_id)."""

    where: str
    addresses: frozenset[tuple[str, int]]
    database: str | None
    identity: tuple[str, ...]


def resolved(host: str, port: int) -> frozenset[tuple[str, int]]:
    """The (address, port) pairs ``host`` resolves to from the operator (none when it does not resolve; the
    identity comparison still applies). IPv4-mapped IPv6 addresses count as IPv4, the unspecified address as
    the loopback it reaches."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return frozenset()
    pairs = set()
    for *_, sockaddr in found:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_unspecified:
            address = ipaddress.ip_address("127.0.0.1" if address.version == 4 else "::1")
        pairs.add((address.compressed, port))
    return frozenset(pairs)


def postgres_identity(conn: Any) -> tuple[str, ...]:
    """``(system_identifier, database OID)`` of a PostgreSQL connection: ``pg_control_system()`` is granted to
    PUBLIC (PostgreSQL 10 and later), so any login reads it."""
    row = conn.execute(
        "SELECT (SELECT system_identifier FROM pg_control_system()),"
        " (SELECT oid FROM pg_database WHERE datname = current_database())"
    ).fetchone()
    return (str(row[0]), str(row[1]))


def redis_identity(client: Any, info: str = "INFO") -> tuple[str, ...]:
    """``(run_id,)`` of a Redis server (``INFO server``, sent as ``info``: the server may rename INFO)."""
    answer = client.execute_command(info, "server")
    if isinstance(answer, dict):
        return (str(answer.get("run_id")),)
    text = answer.decode() if isinstance(answer, bytes) else str(answer)
    run_id = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("run_id:")), "")
    return (run_id,)


def refuse_source(policy: str, *, target: Endpoint, source: Endpoint) -> None:
    """``TargetIsSource`` naming the policy's ``spec.verification.target`` when the drill's target is the source:
    the same address and port with the same database (or any database of a Redis), or a server that says it is
    the same one (the same PostgreSQL cluster and database, the same Redis process)."""
    shared = sorted(target.addresses & source.addresses)
    if shared and target.database == source.database:
        address, port = shared[0]
        why = f"both reach {address}:{port}" + (f" and database {target.database}" if target.database else "")
    elif target.identity == source.identity and all(target.identity):
        why = (
            "the server there is the source's (the same system_identifier and database OID)"
            if target.database is not None
            else "the server there is the source's (the same run_id)"
        )
    else:
        return
    raise RunbookError(
        "TargetIsSource",
        f"BackupPolicy {policy} spec.verification.target: {target.where} is the source {source.where} ({why}); "
        "a drill restores only into a scratch database, never the source",
    )
