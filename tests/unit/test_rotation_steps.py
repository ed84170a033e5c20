"""SecretRotation's step table, one pass at a time, against the in-memory API and a fake Target (no server).

Every step; a crash right after each step's checkpoint and one just before it (the step's side effects made,
its record not written), each resumed by a fresh Context from the stored object, ends as an uninterrupted
rotation does: the target knows only the new password, the Secret holds it (published once), the pending
Secret is gone, the restart target carries the rotation.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from runbook_operator.builders import rotation as build
from runbook_operator.clients import kube
from runbook_operator.errors import RunbookError
from runbook_operator.models.rotation import RotationStep
from runbook_operator.reconcilers import rotation, runtime
from runbook_operator.reconcilers.rotation_targets import Pending
from runbook_operator.reconcilers.runtime import Context, Result
from tests.fake_api import FakeApi

NS, NAME, SECRET = "team-a", "app", "db-credentials"
OLD = "old-password-value"
START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Crash(BaseException):
    """The operator process dies (not an Exception: no pass reports it)."""


@dataclass
class FakeTarget:
    """A Redis-like target: apply adds a password next to the old ones, retire keeps only the new one."""

    passwords: set[str] = field(default_factory=lambda: {OLD})
    calls: list[str] = field(default_factory=list)
    refuse_verify: int = 0
    kind = "redis"

    def check(self) -> None:
        self.calls.append("check")

    def login_role(self, named: str | None) -> str | None:
        return None

    def apply(self, pending: Pending) -> None:
        self.calls.append("apply")
        self.passwords.add(pending.password)

    def verify(self, pending: Pending) -> None:
        self.calls.append("verify")
        if self.refuse_verify:
            self.refuse_verify -= 1
            raise RunbookError("VerificationFailed", "spec.target.redis: refused", retry_after=60)
        assert pending.password in self.passwords

    def retire(self, pending: Pending) -> None:
        self.calls.append("retire")
        self.passwords = {pending.password}


class CrashingApi(FakeApi):
    """Crashes at the status write that records ``step``: after storing it, or instead of it."""

    crash_at: RotationStep | None = None
    stored_first: bool = True

    def patch(
        self,
        resource: kube.Resource,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any] | None:
        recording = (
            subresource == "status" and self.crash_at is not None and patch["status"].get("step") == self.crash_at
        )
        if recording and not self.stored_first:
            self.crash_at = None
            raise Crash
        result = super().patch(resource, namespace, name, patch, subresource=subresource)
        if recording:
            self.crash_at = None
            raise Crash
        return result


class World:
    """The API, the target and a clock; ``step()`` runs one pass on the stored object as the clock would."""

    def __init__(self, api: FakeApi | None = None, **spec: Any) -> None:
        self.api = api or FakeApi()
        self.target = FakeTarget()
        self.now = START
        self.reconciler = rotation.reconciler(targets=lambda api, namespace, spec: self.target)
        self.api.put(
            kube.SECRETS, NS, {"metadata": {"name": SECRET}, "data": {"password": b64(OLD), "other": b64("x")}}
        )
        self.api.put(kube.DEPLOYMENTS, NS, deployment())
        body = {
            "apiVersion": "runbook.dev/v1alpha1",
            "kind": "SecretRotation",
            "metadata": {"name": NAME, "creationTimestamp": "2026-03-01T11:00:00Z"},
            "spec": {
                "secretRef": {"name": SECRET, "key": "password"},
                "restartTargets": [{"kind": "Deployment", "name": "api"}],
                "rotateNow": "1",
                **spec,
            },
        }
        self.api.put(rotation.RESOURCE, NS, body)

    def context(self) -> Context[Any, Any]:
        body = self.api.stored(rotation.RESOURCE, NS, NAME)
        assert body is not None
        return Context.of(self.reconciler, body, self.api, isolation=lambda namespace: None, now=lambda: self.now)

    def step(self, *, finalizing: bool = False) -> Result:
        function = self.reconciler.finalize if finalizing else self.reconciler.reconcile
        assert function is not None
        return runtime.run_pass(self.context(), function)

    def status(self) -> dict[str, Any]:
        body = self.api.stored(rotation.RESOURCE, NS, NAME)
        assert body is not None
        return dict(body.get("status") or {})

    def secret(self, name: str = SECRET) -> dict[str, str] | None:
        found = self.api.stored(kube.SECRETS, NS, name)
        return None if found is None else {k: base64.b64decode(v).decode() for k, v in found["data"].items()}

    def roll_out(self) -> None:
        workload = self.api.stored(kube.DEPLOYMENTS, NS, "api")
        assert workload is not None
        generation = workload["metadata"]["generation"]
        status = {"observedGeneration": generation, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}
        self.api.patch(kube.DEPLOYMENTS, NS, "api", {"status": status}, subresource="status")

    def writes_since(self, mark: int) -> list[Any]:
        return [c for c in self.api.calls[mark:] if c.verb in ("create", "apply", "patch", "delete")]

    def publications(self) -> int:
        return len([c for c in self.api.writes() if (c.verb, c.plural, c.name) == ("patch", "secrets", SECRET)])

    def run_to_done(self, limit: int = 12) -> None:
        """Passes (rollouts finishing as the controller would) until the rotation is recorded Done."""
        for _ in range(limit):
            result = self.step()
            if self.status().get("step") == "Done" and self.status().get("phase") != "Rotating":
                return
            self.roll_out()
            self.now += timedelta(seconds=result.requeue_after or 0)
        raise AssertionError(f"not done: {self.status()}")


def b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def deployment() -> dict[str, Any]:
    labels = {"app": "api"}
    return {
        "metadata": {"name": "api", "generation": 1},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}}},
        "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1},
    }


def assert_rotated(world: World) -> None:
    """The final state of every rotation, interrupted or not."""
    status = world.status()
    secret = world.secret()
    assert secret is not None
    new = secret["password"]
    assert new != OLD and secret["other"] == "x"
    assert world.target.passwords == {new}  # the target knows only the published value
    assert world.publications() == 1  # the Secret was written once
    assert world.secret(build.pending_secret_name(NAME)) is None
    assert status["step"] == "Done" and status["phase"] == "Ready" and status["rotateNow"] == "1"
    assert status["fingerprint"] == build.fingerprint(new)
    assert status["targets"] == [{"kind": "Deployment", "name": "api", "ready": True}]
    assert status["lastRotationTime"] == status["stepTime"]
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions["Ready"] == ("True", "Scheduled") and conditions["Rotated"] == ("True", "Rotated")
    assert conditions["Degraded"] == ("False", "RolledOut")
    workload = world.api.stored(kube.DEPLOYMENTS, NS, "api")
    assert workload is not None
    assert workload["spec"]["template"]["metadata"]["annotations"][build.ROTATION_ID] == status["rotationId"]


def test_an_uninterrupted_rotation_walks_every_step_and_waits_for_the_rollout_without_sleeping() -> None:
    world = World()
    recorded: list[str] = []
    original = world.api.patch

    def spy(resource: kube.Resource, namespace: str, name: str, patch: Mapping[str, Any], **kw: Any) -> Any:
        if kw.get("subresource") == "status" and resource == rotation.RESOURCE and "step" in patch["status"]:
            recorded.append(patch["status"]["step"])
        return original(resource, namespace, name, patch, **kw)

    world.api.patch = spy  # type: ignore[method-assign]
    first = world.step()
    # Started, then every step up to the rollout, each its own checkpoint; the pass returns to wait.
    assert recorded == ["Started", "Generated", "Applied", "Verified", "Published"]
    assert first == Result.after(rotation.ROLLOUT_POLL)
    assert world.status()["phase"] == "Rotating" and world.secret()["password"] != OLD  # type: ignore[index]
    assert world.target.calls == ["check", "apply", "verify"]
    pending = world.secret(build.pending_secret_name(NAME))
    assert pending is not None and pending["password"] == world.secret()["password"]  # type: ignore[index]
    assert OLD in world.target.passwords  # the old password works until the rollout ended

    # A pass while the rollout is in progress looks once, writes nothing and asks to look again.
    mark = len(world.api.calls)
    world.now += timedelta(seconds=2)
    assert world.step() == Result.after(rotation.ROLLOUT_POLL)
    assert world.writes_since(mark) == []

    world.roll_out()
    world.now += timedelta(seconds=2)
    done = world.step()
    assert recorded[5:] == ["Restarted", "Done"]
    assert done == Result.after(rotation.RESYNC)  # rotateNow only: the next pass is a resync
    assert_rotated(world)
    events = [c.body["reason"] for c in world.api.writes() if c.verb == "create" and c.plural == "events"]
    assert events[:1] == ["RotationStarted"] and events[-1] == "Rotated" and "Published" in events

    # A resync with nothing to do writes nothing.
    mark = len(world.api.calls)
    assert world.step() == Result.after(rotation.RESYNC)
    assert world.writes_since(mark) == []


STEPS = list(RotationStep)


@pytest.mark.parametrize("step", STEPS[:-1], ids=str)
def test_a_crash_right_after_a_steps_checkpoint_resumes_to_the_same_end(step: RotationStep) -> None:
    api = CrashingApi()
    api.crash_at = step
    world = World(api)
    with pytest.raises(Crash):
        for _ in range(4):
            world.step()
            world.roll_out()
            world.now += timedelta(seconds=2)
    assert world.status()["step"] == step
    world.run_to_done()
    assert_rotated(world)


@pytest.mark.parametrize("step", STEPS[1:], ids=str)
def test_a_crash_after_a_steps_side_effects_before_its_record_repeats_it(step: RotationStep) -> None:
    api = CrashingApi()
    api.crash_at, api.stored_first = step, False
    world = World(api)
    with pytest.raises(Crash):
        for _ in range(4):
            world.step()
            world.roll_out()
            world.now += timedelta(seconds=2)
    assert world.status()["step"] == STEPS[STEPS.index(step) - 1]
    world.run_to_done()
    assert_rotated(world)


@pytest.mark.parametrize("step", STEPS[1:], ids=str)
def test_the_crash_hook_interrupts_after_the_step_and_the_next_pass_resumes(
    step: RotationStep, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World()
    monkeypatch.setenv(rotation.CRASH_AFTER_ENV, step)
    for _ in range(3):
        result = world.step()
        world.roll_out()
        if result.error is not None:
            break
    assert result.error is not None and f"{rotation.CRASH_AFTER_ENV}={step}:" in result.error.message
    assert world.status()["step"] == STEPS[STEPS.index(step) - 1]
    monkeypatch.delenv(rotation.CRASH_AFTER_ENV)
    world.run_to_done()
    assert_rotated(world)


def test_a_rollout_that_does_not_finish_in_time_ends_degraded_from_the_published_step_time() -> None:
    world = World(rolloutTimeout="30s")
    world.step()
    published = world.status()["stepTime"]
    world.now += timedelta(seconds=29)
    assert world.step() == Result.after(1)  # never past the deadline
    assert world.status()["step"] == "Published"
    world.now += timedelta(seconds=1)
    world.step()
    status = world.status()
    assert status["step"] == "Done" and status["phase"] == "Degraded"
    assert status["targets"][0]["ready"] is False
    assert status["targets"][0]["message"].startswith("not rolled out within 30s: waiting for the controller")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert (conditions["Degraded"]["status"], conditions["Degraded"]["reason"]) == ("True", "RolloutIncomplete")
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "RolloutIncomplete")
    assert published < status["stepTime"]


def test_a_failed_verification_applies_again_on_the_next_pass() -> None:
    world = World()
    world.target.refuse_verify = 1
    result = world.step()
    assert result.error is not None and result.error.reason == "VerificationFailed"
    status = world.status()
    assert status["step"] == "Applied" and status["phase"] == "Rotating"  # in flight: not Failed
    world.run_to_done()
    assert world.target.calls == ["check", "apply", "verify", "apply", "verify", "retire"]
    assert_rotated(world)


def test_a_lost_pending_value_starts_over_before_publishing() -> None:
    api = CrashingApi()
    api.crash_at = RotationStep.APPLIED
    world = World(api)
    with pytest.raises(Crash):
        world.step()
    first = world.secret(build.pending_secret_name(NAME))
    world.api.delete(kube.SECRETS, NS, build.pending_secret_name(NAME))
    world.run_to_done()
    assert_rotated(world)
    assert first is not None and world.secret()["password"] != first["password"]  # type: ignore[index]


def test_deletion_carries_a_rotation_in_flight_through_publishing_only() -> None:
    api = CrashingApi()
    api.crash_at = RotationStep.APPLIED
    world = World(api)
    with pytest.raises(Crash):
        world.step()
    assert world.step(finalizing=True) == Result.done()
    status = world.status()
    assert status["step"] == "Published"
    assert world.secret()["password"] in world.target.passwords  # type: ignore[index]
    workload = world.api.stored(kube.DEPLOYMENTS, NS, "api")
    assert workload is not None and "annotations" not in workload["spec"]["template"]["metadata"]


def test_nothing_starts_while_the_namespace_is_isolated_and_a_bad_reference_fails_before_any_change() -> None:
    world = World()
    ctx = world.context()
    ctx.isolation = lambda namespace: "breach"
    assert runtime.run_pass(ctx, world.reconciler.reconcile) == Result.done()
    status = world.status()
    assert status["phase"] == "Paused" and "rotationId" not in status
    paused = next(c for c in status["conditions"] if c["type"] == "Paused")
    assert paused["reason"] == "NamespaceIsolated" and "EmergencyIsolation breach" in paused["message"]

    world.api.delete(kube.DEPLOYMENTS, NS, "api")
    result = world.step()
    assert result.error is not None and result.error.reason == "RestartTargetNotFound"
    status = world.status()
    assert status["phase"] == "Failed" and "rotationId" not in status and "step" not in status
    assert world.secret()["password"] == OLD and world.target.passwords == {OLD}  # type: ignore[index]
