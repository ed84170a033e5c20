"""SecretRotation: a persisted state machine that rotates one password and can be interrupted anywhere.

``ROTATION`` is the kind's ``Reconciler``. Each SecretRotation has one clock (``run_clock``, a kopf daemon
looping in ``runtime.Clocks``): a pass reads the resource fresh (the API server holds all state), then
sleeps for the ``Result``'s requeue: until the next rotation is due, a retry, the next resync (at most
``RESYNC``), a rollout check, or a wake-up (the spec changed, or an EmergencyIsolation in the namespace
changed). Between rotations each pass checks every reference the next rotation needs (read-only: the
Secrets, the restart targets, an admin login and the role), so a broken one shows as ``Ready=False`` now
rather than when the rotation is due.

A rotation writes its ``rotationId`` to status before any side effect, then walks ``STEP_TABLE``, writing
each completed step (``models.rotation.RotationStep``) to ``status.step``:

    Started -> Generated -> Applied -> Verified -> Published -> Restarted -> Done

Generated: the new password is in an operator-owned pending Secret (retries reuse it). Applied/Verified:
the target accepts it (``rotation_targets.Target``) and a login with it works; a resumed rotation re-applies
until verified. Published: one write of the rotated Secret. Restarted: the restart targets' pod templates
carry the rotationId and their rollouts finished, or ``rolloutTimeout`` (from the Published step's
``stepTime``) passed: Degraded; the wait is a pass that checks once and requeues, never a sleep. Done: the
old Redis password is removed, the pending Secret deleted. Every step is idempotent, so a crash before a
step is recorded repeats it; at every moment the Secret's password or the pending one logs in. No step
needs a clean-up after a failure: a failed step is retried (with backoff) from the recorded one.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .. import metrics
from ..builders import rotation as build
from ..clients import kube
from ..errors import RunbookError
from ..logs import REDACTOR, audit
from ..models.common import Condition, parse_duration, parse_time, rfc3339
from ..models.rotation import (
    Generator,
    RolloutRecord,
    RotationPhase,
    RotationStep,
    SecretRotationSpec,
    SecretRotationStatus,
)
from . import runtime, tenancy
from .rotation_targets import MISSING_RETRY, REFUSED_RETRY, Pending, Target, target_for
from .runtime import Context, Reconciler, Result

LOG = logging.getLogger(__name__)
KIND = "SecretRotation"
RESOURCE = kube.custom_resource("secretrotations", KIND)
# Test hook: raise right after the side effects of this step, before it is recorded (crash-safety tests).
CRASH_AFTER_ENV = "RUNBOOK_TEST_CRASH_AFTER"
ROLLOUT_POLL = 2.0  # how often a pass looks at rollouts in progress
# Between rotations the references are checked again this often (a Secret read or two, one admin login):
# a reference broken later shows within minutes; one that is fixed is found by the retry's backoff.
RESYNC = 300.0
ALPHABETS = {
    "alphanumeric": string.ascii_letters + string.digits,
    "base64url": string.ascii_letters + string.digits + "-_",
    "hex": string.digits + "abcdef",
}
ORDER = tuple(RotationStep)

CLOCKS = runtime.Clocks()
RotationContext = Context[SecretRotationSpec, SecretRotationStatus]
TargetFor = Callable[[kube.Api, str, SecretRotationSpec], Target]


def generate_password(generator: Generator) -> str:
    alphabet = ALPHABETS[generator.alphabet]
    return "".join(secrets.choice(alphabet) for _ in range(generator.length))


def _crash_hook(step: RotationStep) -> None:
    if os.environ.get(CRASH_AFTER_ENV) == step:
        raise RuntimeError(f"{CRASH_AFTER_ENV}={step}: interrupted after the step, before recording it")


def _condition(status: SecretRotationStatus, type: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type), None)


def _in_flight(status: SecretRotationStatus) -> bool:
    return status.step not in (None, RotationStep.DONE)


@dataclass(frozen=True)
class Step:
    """One row of the step table. ``run`` makes the step's side effects (idempotent) and returns None once the
    step is complete, or a Result to be passed again (a wait); ``record`` sets the status facts written with
    the step; ``resume_from``: a resumed rotation repeats that earlier step before this one (verification
    re-applies)."""

    name: RotationStep
    run: Callable[[Rotation], Result | None]
    record: Callable[[Rotation], None] | None = None
    resume_from: RotationStep | None = None


@dataclass
class Rotation:
    """One pass over one SecretRotation."""

    ctx: RotationContext
    target: Target
    pending: Pending | None = None
    announcements: list[tuple[str, str]] = field(default_factory=list)  # Normal Events to post once written

    @property
    def spec(self) -> SecretRotationSpec:
        return self.ctx.spec

    @property
    def status(self) -> SecretRotationStatus:
        return self.ctx.status

    def _tell(self, reason: str, message: str) -> None:
        LOG.info("%s %s/%s: %s", KIND, self.ctx.namespace, self.ctx.name, message)
        self.ctx.event("Normal", reason, message)

    def _commit(self) -> None:
        """Write the status changes now (nothing when there are none), then post the Events that announce them
        (none when the write failed: the next pass announces them again)."""
        self.ctx.checkpoint()
        announcements, self.announcements = self.announcements, []
        for reason, message in announcements:
            self._tell(reason, message)

    def converge(self) -> Result:
        self.status.target_kind = self.target.kind
        if not _in_flight(self.status):
            if not self._due():
                self._preflight()  # read-only: a broken reference shows now, not when the rotation is due
                return self._idle()
            holder = self.ctx.isolation(self.ctx.namespace)
            if holder is not None:
                return self._pause(holder)
            self.ctx.condition("Paused", "False", "NotIsolated")
            self._preflight()
            self._start()
        waiting = self.advance()
        return waiting if waiting is not None else self._idle()

    def advance(self, *, through: RotationStep = RotationStep.DONE) -> Result | None:
        """Carry the rotation in flight on from its recorded step through ``through`` (deletion: Published);
        a Result when a step waits."""
        assert self.status.rotation_id is not None  # in flight
        self.pending = self._read_pending(self.status.rotation_id)
        done = self.status.step or RotationStep.STARTED
        if ORDER.index(done) < ORDER.index(RotationStep.PUBLISHED) and self.pending is None:
            done = RotationStep.STARTED  # not generated yet, or lost: start over from a new value
        upcoming = [s for s in STEP_TABLE if ORDER.index(done) < ORDER.index(s.name) <= ORDER.index(through)]
        if upcoming and upcoming[0].resume_from is not None:
            upcoming = [s for s in STEP_TABLE if s.name == upcoming[0].resume_from] + upcoming
        for step in upcoming:
            waiting = step.run(self)
            if waiting is not None:
                return waiting
            _crash_hook(step.name)
            self.status.step, self.status.step_time = step.name, rfc3339(self.ctx.now())
            if step.record is not None:
                step.record(self)
            self._commit()
        return None

    # ------------------------------------------------------------------------------------ schedule

    def _next_due(self) -> datetime | None:
        created = parse_time(self.ctx.body["metadata"]["creationTimestamp"])
        assert created is not None
        return build.next_rotation(self.spec, last=parse_time(self.status.last_rotation_time), created=created)

    def _due(self) -> bool:
        if self.spec.rotate_now is not None and self.spec.rotate_now != self.status.rotate_now:
            return True
        due = self._next_due()
        return due is not None and due <= self.ctx.now()

    def _idle(self) -> Result:
        """Status between rotations; a pass again when the next one is due or at the next resync."""
        due = self._schedule()
        self._commit()
        return Result.after(RESYNC if due is None else min(RESYNC, (due - self.ctx.now()).total_seconds()))

    def _schedule(self) -> datetime | None:
        """The next rotation time, Ready and the metric, as they stand between rotations (not yet written)."""
        namespace, name = self.ctx.namespace, self.ctx.name
        due = self._next_due()
        last = parse_time(self.status.last_rotation_time)
        if last is not None:
            metrics.SECRET_LAST_ROTATION.labels(namespace, name).set(last.timestamp())
        self.status.next_rotation_time = rfc3339(due) if due else None
        if due:
            metrics.SECRET_NEXT_ROTATION.labels(namespace, name).set(due.timestamp())
        else:
            metrics.SECRET_NEXT_ROTATION.remove(namespace, name)
        degraded = _condition(self.status, "Degraded")
        if degraded is not None and degraded.status == "True":
            self.ctx.condition("Ready", "False", degraded.reason, degraded.message)
            self.status.phase = RotationPhase.DEGRADED
        else:
            when = f"next rotation at {rfc3339(due)}" if due else "rotates when spec.rotateNow changes"
            ready = _condition(self.status, "Ready")
            if ready is None or ready.status != "True":  # accepted, or every reference works again
                self.announcements.append(("Scheduled", when))
            self.ctx.condition("Ready", "True", "Scheduled", when)
            self.status.phase = RotationPhase.READY
        return due

    def _pause(self, isolation: str) -> Result:
        """Paused until the isolation ends (its changes wake the clock); a rotation in flight is not paused."""
        message = f"EmergencyIsolation {isolation} is active in the namespace: no rotation starts until it is released"
        if self.status.phase != RotationPhase.PAUSED:
            self.ctx.event("Warning", "NamespaceIsolated", message)
        self.ctx.condition("Paused", "True", "NamespaceIsolated", message)
        self.status.phase = RotationPhase.PAUSED
        return Result.done()

    # ------------------------------------------------------------------------------------ the steps

    def _preflight(self) -> None:
        """Every input a rotation needs, checked before it starts: a bad one leaves nothing half-done."""
        api, namespace, spec = self.ctx.api, self.ctx.namespace, self.spec
        kube.secret_value(api, namespace, spec.secret_ref.name, spec.secret_ref.key, field="spec.secretRef")
        self._rotated_secret()
        self._pending_secret()
        for index, ref in enumerate(spec.restart_targets):
            if api.get(kube.workload(ref.kind), namespace, ref.name) is None:
                raise RunbookError(
                    "RestartTargetNotFound",
                    f"spec.restartTargets[{index}]: {ref.kind} {ref.name} not found",
                    retry_after=MISSING_RETRY,
                )
        self.target.check()

    def _start(self) -> None:
        rotation_id = uuid.uuid4().hex[:16]
        status = self.status
        status.rotation_id, status.step, status.step_time = rotation_id, RotationStep.STARTED, rfc3339(self.ctx.now())
        status.rotate_now, status.targets, status.phase = self.spec.rotate_now, [], RotationPhase.ROTATING
        self.ctx.condition("Rotated", "Unknown", "InProgress", f"rotation {rotation_id} started")
        self._commit()
        self._tell("RotationStarted", f"Rotation {rotation_id} started")

    def _generate(self) -> None:
        """(a) A new value, stored in the pending Secret before it is used anywhere (kept when stored already)."""
        assert self.status.rotation_id is not None
        if self.pending is not None:
            return
        password = generate_password(self.spec.generator)
        REDACTOR.register(password)
        username = self.target.login_role(self._secret_username() if self.spec.strategy == "dual" else None)
        rotation_id = self.status.rotation_id
        manifest = build.build_pending_secret(
            self.ctx.body, rotation_id=rotation_id, password=password, username=username
        )
        if not self.ctx.api.create(kube.SECRETS, self.ctx.namespace, manifest):
            # A pending Secret of an older rotation (ownership checked by _read_pending): refill it.
            refill = build.refill_pending_secret(rotation_id=rotation_id, password=password, username=username)
            self.ctx.api.patch(kube.SECRETS, self.ctx.namespace, manifest["metadata"]["name"], refill)
        self._tell("Generated", f"Rotation {rotation_id}: new value generated (pending Secret)")
        self.pending = Pending(password, username)

    def _apply(self) -> None:
        """(b) The target accepts the new value; the old one keeps working where the target allows it."""
        assert self.pending is not None
        self.target.apply(self.pending)

    def _verify(self) -> None:
        """(c) A login with the new value works."""
        assert self.pending is not None
        self.target.verify(self.pending)

    def _publish(self) -> None:
        """(d) The rotated Secret gets the new value (and dual's user name) in one write."""
        assert self.pending is not None
        ref, pending = self.spec.secret_ref, self.pending
        secret = self._rotated_secret()
        patch = {
            **build.claim_patch(self.ctx.name),
            **build.publish_patch(self.spec, password=pending.password, username=pending.username),
        }
        data, annotations = secret.get("data") or {}, secret["metadata"].get("annotations") or {}
        if annotations.get(build.ROTATED_BY) != self.ctx.name or any(
            data.get(key) != value for key, value in patch["data"].items()
        ):
            self.ctx.api.patch(kube.SECRETS, self.ctx.namespace, ref.name, patch)
        self._tell(
            "Published",
            f"Published to Secret {ref.name} key {ref.key} (fingerprint {build.fingerprint(pending.password)})"
            + (f" for login role {pending.username}" if pending.username else ""),
        )

    def _record_published(self) -> None:
        assert self.pending is not None
        self.status.fingerprint = build.fingerprint(self.pending.password)
        self.status.active_role = self.pending.username

    def _restart(self) -> Result | None:
        """(e) Stamp the rotation on each target's pod template, then look at the rollouts once: a Result to
        look again while one rolls and ``rolloutTimeout`` (from the Published step's stepTime) has not passed."""
        api, namespace, spec = self.ctx.api, self.ctx.namespace, self.spec
        rotation_id = self.status.rotation_id
        assert rotation_id is not None
        waiting: dict[int, str] = {}
        for index, ref in enumerate(spec.restart_targets):
            resource = kube.workload(ref.kind)
            workload = api.get(resource, namespace, ref.name)
            template = (workload or {}).get("spec", {}).get("template", {})
            if (
                workload is not None
                and (template.get("metadata", {}).get("annotations") or {}).get(build.ROTATION_ID) != rotation_id
            ):
                workload = api.patch(resource, namespace, ref.name, build.restart_patch(rotation_id))
                self._tell("Restarting", f"Restarting {ref.kind} {ref.name}")
            reason = "not found" if workload is None else build.rollout_pending(ref.kind, workload)
            if reason is not None:
                waiting[index] = reason
        started = parse_time(self.status.step_time)
        assert started is not None
        left = (started + parse_duration(spec.rollout_timeout) - self.ctx.now()).total_seconds()
        if any(reason != "not found" for reason in waiting.values()) and left > 0:
            return Result.after(min(ROLLOUT_POLL, left))
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
        self.status.targets = records
        stuck = [r for r in records if not r.ready]
        if stuck:
            message = "; ".join(f"{r.kind} {r.name} {r.message}" for r in stuck)
            self.ctx.condition("Degraded", "True", "RolloutIncomplete", message)
            self.ctx.event("Warning", "RolloutIncomplete", message)
        else:
            rolled = ", ".join(f"{r.kind} {r.name}" for r in records) or "no restart targets"
            self.ctx.condition("Degraded", "False", "RolledOut", f"rolled out: {rolled}")
        return None

    def _retire(self) -> None:
        """(f) Only the new password works where the target kept the old one; the pending Secret goes."""
        if self.pending is not None:
            self.target.retire(self.pending)
        self.ctx.api.delete(kube.SECRETS, self.ctx.namespace, build.pending_secret_name(self.ctx.name))

    def _record_done(self) -> None:
        """The rotation recorded with the next rotation time and Ready (one write), then the audit line and the
        Event."""
        status, spec = self.status, self.spec
        status.last_rotation_time = status.step_time
        self.ctx.condition(
            "Rotated", "True", "Rotated", f"rotation {status.rotation_id} finished (fingerprint {status.fingerprint})"
        )
        self._schedule()
        self._commit()
        audit(
            "secret_rotated",
            namespace=self.ctx.namespace,
            name=self.ctx.name,
            kind=KIND,
            rotationId=status.rotation_id,
            secret=spec.secret_ref.name,
            key=spec.secret_ref.key,
            fingerprint=status.fingerprint,
            target=self.target.kind,
            activeRole=status.active_role,
            restarted=[f"{r.kind}/{r.name}" for r in status.targets if r.ready],
            notRolledOut=[f"{r.kind}/{r.name}" for r in status.targets if not r.ready],
        )
        self._tell(
            "Rotated",
            f"Rotation {status.rotation_id} finished: Secret {spec.secret_ref.name} fingerprint {status.fingerprint}",
        )

    # ------------------------------------------------------------------------------------ reading

    def _rotated_secret(self) -> dict[str, Any]:
        """The Secret ``spec.secretRef`` names, when this rotation may write it (else ``SecretNotRotatable``
        naming the field); publishing marks it as this rotation's (``build.ROTATED_BY``)."""
        ref = self.spec.secret_ref
        secret = self.ctx.api.get(kube.SECRETS, self.ctx.namespace, ref.name)
        if secret is None:
            raise RunbookError(
                "SecretNotFound", f"spec.secretRef: Secret {ref.name} not found", retry_after=MISSING_RETRY
            )
        why = build.rotated_secret_refusal(self.spec, secret, owner=self.ctx.body)
        if why is not None:
            raise RunbookError(
                "SecretNotRotatable",
                f"spec.secretRef.name: Secret {ref.name} is not rotated: {why}",
                retry_after=REFUSED_RETRY,
            )
        return secret

    def _pending_secret(self) -> dict[str, Any] | None:
        """The pending Secret if it exists; one this resource does not own is a conflict."""
        name = build.pending_secret_name(self.ctx.name)
        secret = self.ctx.api.get(kube.SECRETS, self.ctx.namespace, name)
        if secret is None:
            return None
        owners = secret["metadata"].get("ownerReferences") or []
        if not any(ref.get("uid") == self.ctx.body["metadata"]["uid"] for ref in owners):
            raise RunbookError(
                "PendingSecretConflict",
                f"Secret {name} exists and is not owned by this SecretRotation: rename or delete it",
                retry_after=REFUSED_RETRY,
            )
        return secret

    def _read_pending(self, rotation_id: str) -> Pending | None:
        """The pending value of this rotation, if stored; a pending Secret of another rotation counts as none."""
        secret = self._pending_secret()
        if secret is None or (secret["metadata"].get("annotations") or {}).get(build.ROTATION_ID) != rotation_id:
            return None
        data = secret.get("data") or {}
        password = base64.b64decode(data[build.PENDING_PASSWORD]).decode()
        REDACTOR.register(password)
        username = data.get(build.PENDING_USERNAME)
        return Pending(password, base64.b64decode(username).decode() if username else None)

    def _secret_username(self) -> str | None:
        """The login role the rotated Secret names now (dual), if any."""
        ref = self.spec.secret_ref
        if ref.username_key is None:
            return None
        try:
            return kube.secret_value(
                self.ctx.api,
                self.ctx.namespace,
                ref.name,
                ref.username_key,
                field="spec.secretRef.usernameKey",
                redact=False,
            )
        except RunbookError as error:
            if error.reason == "SecretKeyMissing":
                return None
            raise


STEP_TABLE = (
    Step(RotationStep.GENERATED, Rotation._generate),
    Step(RotationStep.APPLIED, Rotation._apply),
    Step(RotationStep.VERIFIED, Rotation._verify, resume_from=RotationStep.APPLIED),
    Step(RotationStep.PUBLISHED, Rotation._publish, record=Rotation._record_published),
    Step(RotationStep.RESTARTED, Rotation._restart),
    Step(RotationStep.DONE, Rotation._retire, record=Rotation._record_done),
)


def confine(ctx: RotationContext) -> SecretRotationSpec:
    """The spec as the tenancy rules allow it (``tenancy.confine_secret_rotation``), before any Secret is read
    or the target contacted; the SecureConnections condition names a target used without verified TLS."""
    grants = ctx.grants(ctx.namespace)
    spec = ctx.confine(tenancy.confine_secret_rotation(ctx.api, grants, ctx.namespace, ctx.spec))
    target = spec.target
    if target is not None:
        ctx.plaintext(
            tenancy.plaintext_in_use(("spec.target.postgresql", target.postgresql), ("spec.target.redis", target.redis))
        )
    return spec


def reconciler(targets: TargetFor = target_for) -> Reconciler[SecretRotationSpec, SecretRotationStatus]:
    """The kind, its targets given by ``targets`` (tests pass a fake)."""

    def reconcile(ctx: RotationContext) -> Result:
        """Resume or start a rotation when one is in flight or due; else check the references and wait."""
        try:
            spec = confine(ctx)
            return Rotation(ctx, targets(ctx.api, ctx.namespace, spec)).converge()
        except Exception:
            if not _in_flight(ctx.status):
                ctx.status.phase = RotationPhase.FAILED
            raise

    def settle(ctx: RotationContext) -> Result:
        """Deletion: a rotation in flight is carried through publishing first, so the Secret's password works
        once the pending Secret is garbage-collected with the resource."""
        if _in_flight(ctx.status):
            Rotation(ctx, targets(ctx.api, ctx.namespace, confine(ctx))).advance(through=RotationStep.PUBLISHED)
        rotated = str(((ctx.body.get("spec") or {}).get("secretRef") or {}).get("name") or "")
        secret = ctx.api.get(kube.SECRETS, ctx.namespace, rotated) if rotated else None
        if secret is not None and (secret["metadata"].get("annotations") or {}).get(build.ROTATED_BY) == ctx.name:
            ctx.api.patch(kube.SECRETS, ctx.namespace, rotated, build.claim_patch(None))  # another may rotate it now
        return Result.done()

    return Reconciler(RESOURCE, SecretRotationSpec, SecretRotationStatus, reconcile, finalize=settle)


ROTATION = reconciler()
