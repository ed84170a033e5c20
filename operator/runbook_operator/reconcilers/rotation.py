"""SecretRotation: a persisted state machine that rotates one password and can be interrupted anywhere.

Each SecretRotation has one clock (a kopf daemon running ``run_clock``): it reconciles, then sleeps until
the next rotation is due, a retry time, the next resync (at most ``RESYNC``), or a wake-up (the spec
changed, or an EmergencyIsolation in the namespace changed). Every reconcile reads the resource fresh: the
API server holds all state. Between rotations each reconcile checks every reference the next rotation
needs (read-only: the Secrets, the restart targets, an admin login and the role), so a broken one shows as
``Ready=False`` now rather than when the rotation is due.

A rotation writes its ``rotationId`` to status before any side effect, then records each completed step:

    Started -> Generated -> Applied -> Verified -> Published -> Restarted -> Done

Generated: the new password is in an operator-owned pending Secret (retries reuse it). Applied/Verified:
the target accepts it (PostgreSQL ALTER ROLE with a client-side SCRAM verifier; Redis ACL SETUSER adding
it next to the old one) and a login with it works; a resumed rotation re-applies until verified.
Published: one write of the rotated Secret. Restarted: the restart targets' pod templates carry the
rotationId and their rollouts finished (or timed out: Degraded). Done: the old Redis password is removed,
the pending Secret deleted. Every step is idempotent, so a crash before a step is recorded repeats it; at
every moment the Secret's password or the pending one logs in.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import string
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf
import psycopg
import redis
from kubernetes.client import ApiException

from .. import metrics
from ..builders import rotation as build
from ..clients import kube, postgres
from ..clients import redis as redis_client
from ..conditions import get_condition, now_rfc3339
from ..errors import RunbookError
from ..logs import REDACTOR, audit
from ..models import GROUP, VERSION
from ..models.common import CredentialsSecretRef, WorkloadRef, parse_duration
from ..models.rotation import Generator, RedisRotationTarget, RolloutRecord, SecretRotationSpec
from ..models.sources import TLS_CERT_KEY, TLS_KEY_KEY, RedisTLS
from .base import MERGE_PATCH, Clocks, StatusPatch, parse_spec, report_failure, retry_or_stop
from .interlock import active_isolation

KIND = "SecretRotation"
PLURAL = "secretrotations"
STEPS = ("Started", "Generated", "Applied", "Verified", "Published", "Restarted", "Done")
# Test hook: raise right after the side effects of this step, before it is recorded (crash-safety tests).
CRASH_AFTER_ENV = "RUNBOOK_TEST_CRASH_AFTER"
UNREACHABLE_RETRY = 10.0  # first retry while a server is down; doubles per failure
MISSING_RETRY = 30.0  # a Secret, role or workload that may appear
REFUSED_RETRY = 60.0  # a refusal that needs a person (privileges, a failing verification)
ROLLOUT_POLL = 2.0
# Between rotations the references are checked again this often (a Secret read or two, one admin login):
# a reference broken later shows within minutes; one that is fixed is found by the retry's backoff.
RESYNC = 300.0
ALPHABETS = {
    "alphanumeric": string.ascii_letters + string.digits,
    "base64url": string.ascii_letters + string.digits + "-_",
    "hex": string.digits + "abcdef",
}

CLOCKS = Clocks()
_LOCKS: dict[tuple[str, str], threading.Lock] = {}  # the clock and the deletion handler take turns


class Stopped(Exception):
    """kopf is stopping the daemon: leave the rotation where it is, the next run resumes it."""


@dataclass(frozen=True)
class Pending:
    """The rotation's new value, as stored in the pending Secret."""

    password: str
    username: str | None  # the dual strategy's login role


def generate_password(generator: Generator) -> str:
    alphabet = ALPHABETS[generator.alphabet]
    return "".join(secrets.choice(alphabet) for _ in range(generator.length))


def _before(step: str | None, other: str) -> bool:
    return STEPS.index(step or "Started") < STEPS.index(other)


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _crash_hook(step: str) -> None:
    if os.environ.get(CRASH_AFTER_ENV) == step:
        raise RuntimeError(f"{CRASH_AFTER_ENV}={step}: interrupted after the step, before recording it")


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return REDACTOR.scrub(lines[0]) if lines else type(error).__name__


@contextmanager
def _server_errors(field: str, server: str, tls: RedisTLS | None = None, server_name: str = "") -> Iterator[None]:
    """PostgreSQL and Redis failures as RunbookErrors naming the spec field (never a value); a Redis TLS
    failure names the TLS setting to fix."""
    try:
        yield
    except redis_client.TLSFault as fault:
        raise RunbookError("TLSFailed", f"{field}.tls.{fault}", retry_after=REFUSED_RETRY) from None
    except (psycopg.OperationalError, redis.AuthenticationError) as error:
        if isinstance(error, redis.AuthenticationError) or postgres.refused(error):
            raise RunbookError(
                "LoginRefused",
                f"{field}.adminSecretRef: {server} refused the admin login: {_one_line(error)}",
                retry_after=REFUSED_RETRY,
            ) from None
        raise RunbookError(
            "DatabaseUnavailable", f"{field}: cannot reach {server}: {_one_line(error)}", retry_after=UNREACHABLE_RETRY
        ) from None
    except (redis.ConnectionError, redis.TimeoutError) as error:
        cause = redis_client.tls_fault(error, tls, server_name=server_name)
        if cause is not None:
            raise RunbookError("TLSFailed", f"{field}.tls.{cause}", retry_after=REFUSED_RETRY) from None
        raise RunbookError(
            "DatabaseUnavailable", f"{field}: cannot reach {server}: {_one_line(error)}", retry_after=UNREACHABLE_RETRY
        ) from None
    except (psycopg.Error, redis.RedisError) as error:
        raise RunbookError(
            "TargetRefused", f"{field}: {server}: {_one_line(error)}", retry_after=REFUSED_RETRY
        ) from None


# ------------------------------------------------------------------------------------------------ the clock


async def run_clock(body: kopf.Body, *, stopped: kopf.DaemonStopped, logger: kopf.Logger) -> None:
    """Reconcile, sleep until due, retry with backoff, until kopf stops the daemon."""
    namespace, name = str(body.metadata.namespace), str(body.metadata.name)

    async def once() -> float | None:
        try:
            return await asyncio.to_thread(reconcile, namespace, name, lambda: bool(stopped), logger)
        except Stopped:
            return None

    await CLOCKS.run(namespace=namespace, name=name, stopped=stopped, reconcile=once)


# --------------------------------------------------------------------------------------------- reconcile


def _read(namespace: str, name: str) -> kopf.Body | None:
    try:
        raw = kube.custom().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return kopf.Body(raw)


def reconcile(namespace: str, name: str, stopped: Callable[[], bool], logger: kopf.Logger) -> float | None:
    """Resume or start a rotation when one is in flight or due; return the seconds until the next is due."""
    with _LOCKS.setdefault((namespace, name), threading.Lock()):
        body = _read(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        rotation = _Rotation(body, stopped, logger)
        try:
            return rotation.converge()
        except Stopped:
            raise
        except Exception as raised:  # reported, then retried with backoff by the clock
            error = report_failure(body, rotation.status, raised, phase=None if rotation.in_flight else "Failed")
            rotation.commit()
            raise error from None


def settle_before_deletion(body: kopf.Body, *, logger: kopf.Logger) -> None:
    """The deletion handler: a rotation in flight is carried through publishing first, so the Secret's
    password works once the pending Secret is garbage-collected with the resource."""
    namespace, name = str(body.metadata.namespace), str(body.metadata.name)
    with _LOCKS.setdefault((namespace, name), threading.Lock()):
        fresh = _read(namespace, name)
        if fresh is None:
            return
        rotation = _Rotation(fresh, lambda: False, logger)
        if rotation.in_flight:
            try:
                rotation.finish(parse_spec(SecretRotationSpec, fresh.get("spec")), publish_only=True)
            except RunbookError as error:
                report_failure(fresh, rotation.status, error)
                rotation.commit()
                raise retry_or_stop(error) from None
    _LOCKS.pop((namespace, name), None)


class _Rotation:
    """One reconcile of one SecretRotation."""

    def __init__(self, body: kopf.Body, stopped: Callable[[], bool], logger: kopf.Logger) -> None:
        self.body = body
        self.namespace: str = body["metadata"]["namespace"]
        self.name: str = body["metadata"]["name"]
        self.status = StatusPatch(body.get("status"), body["metadata"].get("generation"))
        self.stopped = stopped
        self.logger = logger
        self.announcements: list[tuple[str, str]] = []  # Normal Events to post once the status is written

    def _tell(self, reason: str, message: str) -> None:
        """A log line and an Event (kopf does not post a daemon's log lines as Events)."""
        self.logger.info(message)
        kopf.info(self.body, reason=reason, message=message)

    @property
    def in_flight(self) -> bool:
        return self.status.get("step") not in (None, "Done")

    def commit(self) -> None:
        """Write the collected status changes now (nothing when there are none), then post the Events
        that announce them (none when the write failed: the next reconcile announces them again)."""
        announcements, self.announcements = self.announcements, []
        self.status.write(plural=PLURAL, namespace=self.namespace, name=self.name)
        for reason, message in announcements:
            self._tell(reason, message)

    def converge(self) -> float | None:
        spec = parse_spec(SecretRotationSpec, self.body.get("spec"))
        self.status.set(targetKind=_target_kind(spec))
        if not self.in_flight:
            if not self._due(spec):
                self._preflight(spec)  # read-only: a broken reference shows now, not when the rotation is due
                return self._idle(spec)
            isolation = active_isolation(self.namespace)
            if isolation is not None:
                self._pause(isolation)
                return None
            self.status.condition("Paused", "False", "NotIsolated")
            self._preflight(spec)
            self._start(spec)
        self.finish(spec)
        return self._idle(spec)

    # ------------------------------------------------------------------------------------ schedule

    def _next_due(self, spec: SecretRotationSpec) -> datetime | None:
        last = self.status.get("lastRotationTime")
        created = _time(self.body["metadata"]["creationTimestamp"])
        return build.next_rotation(spec, last=_time(last) if last else None, created=created)

    def _due(self, spec: SecretRotationSpec) -> bool:
        if spec.rotate_now is not None and spec.rotate_now != self.status.get("rotateNow"):
            return True
        due = self._next_due(spec)
        return due is not None and due <= datetime.now(UTC)

    def _idle(self, spec: SecretRotationSpec) -> float:
        """Status between rotations; the seconds until the next one is due or the next resync."""
        due = self._schedule(spec)
        self.commit()
        return RESYNC if due is None else min(RESYNC, max(0.0, (due - datetime.now(UTC)).total_seconds()))

    def _schedule(self, spec: SecretRotationSpec) -> datetime | None:
        """The next rotation time, Ready and the metric, as they stand between rotations (not yet written)."""
        due = self._next_due(spec)
        last = self.status.get("lastRotationTime")
        if last:
            metrics.SECRET_LAST_ROTATION.labels(self.namespace, self.name).set(_time(last).timestamp())
        self.status.set(nextRotationTime=_rfc3339(due) if due else None)
        if due:
            metrics.SECRET_NEXT_ROTATION.labels(self.namespace, self.name).set(due.timestamp())
        else:
            metrics.SECRET_NEXT_ROTATION.remove(self.namespace, self.name)
        degraded = get_condition(self.status.get("conditions"), "Degraded")
        if degraded is not None and degraded["status"] == "True":
            self.status.condition("Ready", "False", degraded["reason"], degraded["message"])
            self.status.set(phase="Degraded")
        else:
            when = f"next rotation at {_rfc3339(due)}" if due else "rotates when spec.rotateNow changes"
            ready = get_condition(self.status.get("conditions"), "Ready")
            if ready is None or ready["status"] != "True":  # accepted, or every reference works again
                self.announcements.append(("Scheduled", when))
            self.status.condition("Ready", "True", "Scheduled", when)
            self.status.set(phase="Ready")
        return due

    def _pause(self, isolation: str) -> None:
        """Paused until the isolation ends (its changes wake the clock); a rotation in flight is not paused."""
        message = f"EmergencyIsolation {isolation} is active in the namespace: no rotation starts until it is released"
        if self.status.get("phase") != "Paused":
            kopf.warn(self.body, reason="NamespaceIsolated", message=message)
        self.status.condition("Paused", "True", "NamespaceIsolated", message)
        self.status.set(phase="Paused")
        self.commit()

    # ------------------------------------------------------------------------------------ the steps

    def _preflight(self, spec: SecretRotationSpec) -> None:
        """Every input a rotation needs, checked before it starts: a bad one leaves nothing half-done."""
        kube.read_secret_value(self.namespace, spec.secret_ref.name, spec.secret_ref.key, field="spec.secretRef")
        self._pending_secret()
        for index, ref in enumerate(spec.restart_targets):
            if self._read_workload(ref) is None:
                raise RunbookError(
                    "RestartTargetNotFound",
                    f"spec.restartTargets[{index}]: {ref.kind} {ref.name} not found",
                    retry_after=MISSING_RETRY,
                )
        target = spec.target
        if target is not None and target.postgresql is not None:
            pg = target.postgresql
            with self._postgres(spec) as conn:
                exists = postgres.role_exists(conn, pg.user)
            if not exists:
                raise RunbookError(
                    "RoleNotFound",
                    f"spec.target.postgresql.user: role {pg.user} does not exist in {pg.host}:{pg.port}",
                    retry_after=MISSING_RETRY,
                )
        elif target is not None and target.redis is not None:
            with self._redis(spec) as client:
                exists = redis_client.user_exists(client, target.redis.user)
            if not exists:
                raise RunbookError(
                    "RoleNotFound",
                    f"spec.target.redis.user: ACL user {target.redis.user} does not exist",
                    retry_after=MISSING_RETRY,
                )

    def _start(self, spec: SecretRotationSpec) -> None:
        rotation_id = uuid.uuid4().hex[:16]
        self.status.set(
            rotationId=rotation_id,
            step="Started",
            stepTime=now_rfc3339(),
            rotateNow=spec.rotate_now,
            targets=[],
            phase="Rotating",
        )
        self.status.condition("Rotated", "Unknown", "InProgress", f"rotation {rotation_id} started")
        self.commit()
        self._tell("RotationStarted", f"Rotation {rotation_id} started")

    def _done(self, step: str, **fields: Any) -> str:
        """Record a completed step (after the test hook, which simulates a crash just before this write)."""
        _crash_hook(step)
        self.status.set(step=step, stepTime=now_rfc3339(), **fields)
        self.commit()
        return step

    def finish(self, spec: SecretRotationSpec, *, publish_only: bool = False) -> None:
        """Carry the rotation in flight on from its last recorded step (only through publishing: deletion)."""
        rotation_id: str = self.status.get("rotationId")
        step: str = self.status.get("step")
        pending = self._read_pending(rotation_id)
        if _before(step, "Published"):
            if pending is None:  # not generated yet, or lost: start over from a new value
                pending, step = self._generate(spec, rotation_id), "Started"
            if _before(step, "Generated"):
                step = self._done("Generated")
            if _before(step, "Verified"):
                self._apply(spec, pending)
                step = self._done("Applied")
                self._verify(spec, pending)
                step = self._done("Verified")
            self._publish(spec, pending)
            step = self._done("Published", fingerprint=build.fingerprint(pending.password), activeRole=pending.username)
        if publish_only:
            return
        if _before(step, "Restarted"):
            self._restart(spec, rotation_id)
            step = self._done("Restarted")
        self._retire(spec, pending, rotation_id)

    def _generate(self, spec: SecretRotationSpec, rotation_id: str) -> Pending:
        """(a) A new value, stored in the pending Secret before it is used anywhere."""
        password = generate_password(spec.generator)
        REDACTOR.register(password)
        username = None
        if spec.strategy == "dual" and spec.target is not None and spec.target.postgresql is not None:
            username = build.idle_role(spec.target.postgresql.user, self._secret_username(spec))
        manifest = build.build_pending_secret(self.body, rotation_id=rotation_id, password=password, username=username)
        core = kube.core()
        try:
            core.create_namespaced_secret(self.namespace, manifest)
        except ApiException as error:
            if error.status != 409:
                raise
            # A pending Secret of an older rotation (ownership checked by _read_pending): replace it.
            core.replace_namespaced_secret(manifest["metadata"]["name"], self.namespace, manifest)
        self._tell("Generated", f"Rotation {rotation_id}: new value generated (pending Secret)")
        return Pending(password, username)

    def _apply(self, spec: SecretRotationSpec, pending: Pending) -> None:
        """(b) The target accepts the new value; the old one keeps working where the target allows it."""
        target = spec.target
        if target is not None and target.postgresql is not None:
            with self._postgres(spec) as conn:
                if pending.username is not None:
                    postgres.set_member_password(conn, pending.username, target.postgresql.user, pending.password)
                else:
                    postgres.set_password(conn, target.postgresql.user, pending.password)
        elif target is not None and target.redis is not None:
            with self._redis(spec) as client:
                redis_client.add_password(client, target.redis.user, pending.password)

    def _verify(self, spec: SecretRotationSpec, pending: Pending) -> None:
        """(c) A login with the new value works."""
        target = spec.target
        if target is not None and target.postgresql is not None:
            pg = target.postgresql
            user = pending.username or pg.user
            with _server_errors("spec.target.postgresql", f"PostgreSQL {pg.host}:{pg.port}"):
                ok = postgres.login_works(
                    host=pg.host, port=pg.port, database=pg.database, user=user, password=pending.password
                )
            field = "spec.target.postgresql"
        elif target is not None and target.redis is not None:
            rd = target.redis
            user = rd.user
            material = self._redis_tls(spec)
            with _server_errors(*_redis_where(rd)):
                ok = redis_client.login_works(
                    host=rd.host, port=rd.port, tls=rd.tls, material=material, user=user, password=pending.password
                )
            field = "spec.target.redis"
        else:
            return
        if not ok:
            raise RunbookError(
                "VerificationFailed",
                f"{field}: a login as {user} with the new password was refused; it will be applied again",
                retry_after=REFUSED_RETRY,
            )

    def _publish(self, spec: SecretRotationSpec, pending: Pending) -> None:
        """(d) The rotated Secret gets the new value (and dual's user name) in one write."""
        ref = spec.secret_ref
        try:
            secret = kube.core().read_namespaced_secret(ref.name, self.namespace)
        except ApiException as error:
            if error.status == 404:
                raise RunbookError(
                    "SecretNotFound", f"spec.secretRef: Secret {ref.name} not found", retry_after=MISSING_RETRY
                ) from None
            raise
        patch = build.publish_patch(spec, password=pending.password, username=pending.username)
        data = secret.data or {}
        if any(data.get(key) != value for key, value in patch["data"].items()):
            kube.core().patch_namespaced_secret(ref.name, self.namespace, patch, _content_type=MERGE_PATCH)
        self._tell(
            "Published",
            f"Published to Secret {ref.name} key {ref.key} (fingerprint {build.fingerprint(pending.password)})"
            + (f" for login role {pending.username}" if pending.username else ""),
        )

    def _restart(self, spec: SecretRotationSpec, rotation_id: str) -> None:
        """(e) Stamp the rotation on each target's pod template, then wait for all rollouts (one deadline)."""
        waiting: dict[int, str] = {}
        for index, ref in enumerate(spec.restart_targets):
            workload = self._read_workload(ref)
            if workload is None:
                waiting[index] = "not found"
                continue
            annotations = workload.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations") or {}
            if annotations.get(build.ROTATION_ID) != rotation_id:
                patch = build.restart_patch(rotation_id)
                if ref.kind == "Deployment":
                    kube.apps().patch_namespaced_deployment(ref.name, self.namespace, patch, _content_type=MERGE_PATCH)
                else:
                    kube.apps().patch_namespaced_stateful_set(
                        ref.name, self.namespace, patch, _content_type=MERGE_PATCH
                    )
                self._tell("Restarting", f"Restarting {ref.kind} {ref.name}")
            waiting[index] = "rollout not observed yet"
        deadline = _time(self.status.get("stepTime")).timestamp() + parse_duration(spec.rollout_timeout).total_seconds()
        while True:
            for index in [i for i, reason in waiting.items() if reason != "not found"]:
                workload = self._read_workload(spec.restart_targets[index])
                reason = (
                    "not found"
                    if workload is None
                    else build.rollout_pending(spec.restart_targets[index].kind, workload)
                )
                if reason is None:
                    del waiting[index]
                else:
                    waiting[index] = reason
            if all(reason == "not found" for reason in waiting.values()) or time.time() >= deadline:
                break
            if self.stopped():
                raise Stopped
            time.sleep(ROLLOUT_POLL)
        records = [
            RolloutRecord(
                kind=ref.kind,
                name=ref.name,
                ready=index not in waiting,
                message=None
                if index not in waiting
                else f"not rolled out within {spec.rollout_timeout}: {waiting[index]}",
            )
            for index, ref in enumerate(spec.restart_targets)
        ]
        self.status.set(targets=[r.to_api() for r in records])
        stuck = [r for r in records if not r.ready]
        if stuck:
            message = "; ".join(f"{r.kind} {r.name} {r.message}" for r in stuck)
            self.status.condition("Degraded", "True", "RolloutIncomplete", message)
            kopf.warn(self.body, reason="RolloutIncomplete", message=message)
        else:
            rolled = ", ".join(f"{r.kind} {r.name}" for r in records) or "no restart targets"
            self.status.condition("Degraded", "False", "RolledOut", f"rolled out: {rolled}")

    def _retire(self, spec: SecretRotationSpec, pending: Pending | None, rotation_id: str) -> None:
        """(f) Only the new Redis password remains; the pending Secret goes; the rotation is recorded."""
        target = spec.target
        if pending is not None and target is not None and target.redis is not None:
            with self._redis(spec) as client:
                redis_client.keep_only_password(client, target.redis.user, pending.password)
        try:
            kube.core().delete_namespaced_secret(build.pending_secret_name(self.name), self.namespace)
        except ApiException as error:
            if error.status != 404:
                raise
        _crash_hook("Done")
        now = datetime.now(UTC)
        fingerprint = self.status.get("fingerprint")
        self.status.set(step="Done", stepTime=_rfc3339(now), lastRotationTime=_rfc3339(now))
        self.status.condition(
            "Rotated", "True", "Rotated", f"rotation {rotation_id} finished (fingerprint {fingerprint})"
        )
        self._schedule(spec)  # one write: Done together with the next rotation time and Ready
        self.commit()
        records = [RolloutRecord.model_validate(r) for r in self.status.get("targets") or []]
        audit(
            "secret_rotated",
            namespace=self.namespace,
            name=self.name,
            kind=KIND,
            rotationId=rotation_id,
            secret=spec.secret_ref.name,
            key=spec.secret_ref.key,
            fingerprint=fingerprint,
            target=_target_kind(spec),
            activeRole=self.status.get("activeRole"),
            restarted=[f"{r.kind}/{r.name}" for r in records if r.ready],
            notRolledOut=[f"{r.kind}/{r.name}" for r in records if not r.ready],
        )
        self._tell(
            "Rotated", f"Rotation {rotation_id} finished: Secret {spec.secret_ref.name} fingerprint {fingerprint}"
        )

    # ------------------------------------------------------------------------------------ reading

    def _pending_secret(self) -> Any:
        """The pending Secret (a V1Secret) if it exists; one this resource does not own is a conflict."""
        name = build.pending_secret_name(self.name)
        try:
            secret = kube.core().read_namespaced_secret(name, self.namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        owners = secret.metadata.owner_references or []
        if not any(ref.uid == self.body["metadata"]["uid"] for ref in owners):
            raise RunbookError(
                "PendingSecretConflict",
                f"Secret {name} exists and is not owned by this SecretRotation: rename or delete it",
                retry_after=REFUSED_RETRY,
            )
        return secret

    def _read_pending(self, rotation_id: str) -> Pending | None:
        """The pending value of this rotation, if stored; a pending Secret of another rotation counts as none."""
        secret = self._pending_secret()
        if secret is None or (secret.metadata.annotations or {}).get(build.ROTATION_ID) != rotation_id:
            return None
        data = secret.data or {}
        password = base64.b64decode(data[build.PENDING_PASSWORD]).decode()
        REDACTOR.register(password)
        username = data.get(build.PENDING_USERNAME)
        return Pending(password, base64.b64decode(username).decode() if username else None)

    def _secret_username(self, spec: SecretRotationSpec) -> str | None:
        """The login role the rotated Secret names now (dual), if any."""
        ref = spec.secret_ref
        if ref.username_key is None:
            return None
        try:
            return kube.read_secret_value(
                self.namespace, ref.name, ref.username_key, field="spec.secretRef.usernameKey", redact=False
            )
        except RunbookError as error:
            if error.reason == "SecretKeyMissing":
                return None
            raise

    def _read_workload(self, ref: WorkloadRef) -> dict[str, Any] | None:
        try:
            if ref.kind == "Deployment":
                workload = kube.apps().read_namespaced_deployment(ref.name, self.namespace)
            else:
                workload = kube.apps().read_namespaced_stateful_set(ref.name, self.namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        serialized: dict[str, Any] = kube.api_client().sanitize_for_serialization(workload)
        return serialized

    def _admin(self, ref: CredentialsSecretRef, field: str) -> tuple[str, str]:
        user = kube.read_secret_value(self.namespace, ref.name, ref.username_key, field=field, redact=False)
        password = kube.read_secret_value(self.namespace, ref.name, ref.password_key, field=field)
        return user, password

    @contextmanager
    def _postgres(self, spec: SecretRotationSpec) -> Iterator[psycopg.Connection[Any]]:
        assert spec.target is not None and spec.target.postgresql is not None  # callers check
        pg = spec.target.postgresql
        user, password = self._admin(pg.admin_secret_ref, "spec.target.postgresql.adminSecretRef")
        with (
            _server_errors("spec.target.postgresql", f"PostgreSQL {pg.host}:{pg.port}"),
            postgres.connect(host=pg.host, port=pg.port, database=pg.database, user=user, password=password) as conn,
        ):
            yield conn

    def _redis_tls(self, spec: SecretRotationSpec) -> redis_client.TLSMaterial | None:
        """The CA and the client pair from their Secrets (the key registered with the redactor)."""
        assert spec.target is not None and spec.target.redis is not None  # callers check
        tls = spec.target.redis.tls
        if tls is None or not tls.enabled:
            return None
        field = "spec.target.redis.tls"
        ca = certificate = key = None
        if tls.ca_secret_ref is not None:
            ref = tls.ca_secret_ref
            ca = kube.read_secret_value(self.namespace, ref.name, ref.key, field=f"{field}.caSecretRef", redact=False)
        if tls.client_certificate_secret_ref is not None:
            name, pair = tls.client_certificate_secret_ref.name, f"{field}.clientCertificateSecretRef"
            certificate = kube.read_secret_value(self.namespace, name, TLS_CERT_KEY, field=pair, redact=False)
            key = kube.read_secret_value(self.namespace, name, TLS_KEY_KEY, field=pair)
        return redis_client.TLSMaterial(ca=ca, certificate=certificate, key=key)

    @contextmanager
    def _redis(self, spec: SecretRotationSpec) -> Iterator[redis.Redis]:
        assert spec.target is not None and spec.target.redis is not None  # callers check
        rd = spec.target.redis
        user, password = self._admin(rd.admin_secret_ref, "spec.target.redis.adminSecretRef")
        material = self._redis_tls(spec)
        with _server_errors(*_redis_where(rd)):
            client = redis_client.connect(
                host=rd.host, port=rd.port, tls=rd.tls, material=material, user=user, password=password
            )
            try:
                yield client
            finally:
                client.close()


def _redis_where(target: RedisRotationTarget) -> tuple[str, str, RedisTLS | None, str]:
    """``_server_errors``' arguments for a Redis target: its field, its address, its TLS and checked name."""
    server_name = (target.tls.server_name if target.tls is not None else None) or target.host
    return "spec.target.redis", f"Redis {target.host}:{target.port}", target.tls, server_name


def _target_kind(spec: SecretRotationSpec) -> str:
    if spec.target is not None and spec.target.postgresql is not None:
        return "postgresql"
    if spec.target is not None and spec.target.redis is not None:
        return "redis"
    return "secret-only"
